package loader

import "github.com/cilium/ebpf"

// LinkPin is one link an attach makes: its pin's name in the pod's directory and where
// the kernel runs its program. For tests and tools that check an attachment is whole.
type LinkPin struct {
	Pin    string
	Attach ebpf.AttachType
	// Inbound and Outbound say which directions need it (getsockopt and sockops: both).
	Inbound, Outbound bool
}

// Links lists the links an attach with opts makes, in attach order.
func Links(opts Options) []LinkPin {
	var out []LinkPin
	for _, p := range programs {
		if p.wanted(opts) {
			out = append(out, LinkPin{Pin: p.pin, Attach: p.attach, Inbound: p.inbound, Outbound: p.outbound})
		}
	}
	return out
}
