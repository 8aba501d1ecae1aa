package loader

import (
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/meshdivert/divert/policy"
	"github.com/meshdivert/divert/test/testutil"
)

const noBTFChild = "DIVERT_TEST_NO_KERNEL_BTF"

// A kernel without BTF (no /sys/kernel/btf/vmlinux) still loads the programs: the code that
// reads the socket's group through the kernel's types is dead there, and owner groups are
// refused instead, wrapping ErrNotSupported. Run in a child whose mount namespace hides the
// kernel's BTF.
func TestNoKernelBTF(t *testing.T) {
	testutil.RequirePrivileged(t)
	if os.Getenv(noBTFChild) == "1" {
		if err := unix.Mount("tmpfs", "/sys/kernel/btf", "tmpfs", 0, ""); err != nil {
			t.Fatalf("hide the kernel's BTF: %v", err)
		}
		if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err == nil {
			t.Fatal("the kernel's BTF is still there")
		}
		// A root that is no bpffs: the node's programs are loaded and closed, not pinned.
		if err := probePrograms(Options{BPFFS: t.TempDir()}); err != nil {
			t.Fatalf("load without kernel BTF: %v", err)
		}
		cfg := policy.Default()
		cfg.OutboundOwnerGroups = policy.OwnerGroups{Only: true, Include: []uint32{1000}}
		err := CheckPolicy(&cfg)
		var pe *PolicyError
		if !errors.As(err, &pe) || !errors.Is(err, ebpf.ErrNotSupported) || !strings.Contains(err.Error(), "no kernel BTF") {
			t.Fatalf("owner groups without kernel BTF: want a PolicyError naming it, got %v", err)
		}
		if err := CheckPolicy(&[]policy.Config{policy.Default()}[0]); err != nil {
			t.Fatalf("the default policy without kernel BTF: %v", err)
		}
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run", "^TestNoKernelBTF$", "-test.v")
	cmd.Env = append(os.Environ(), noBTFChild+"=1")
	// Go makes the new mount namespace's mounts private before exec.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestNoKernelBTF") {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		t.Fatalf("the child's mount leaked here: %v", err)
	}
}
