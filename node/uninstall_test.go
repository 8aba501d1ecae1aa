package node

import (
	"context"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
)

// Only a DaemonSet that is gone or being deleted means uninstall; a restart, an upgrade,
// a replaced DaemonSet or anything unreadable keeps divert-cni chained.
func TestUninstalling(t *testing.T) {
	agentPod := func(owners ...metav1.OwnerReference) *corev1.Pod {
		return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "divert-node-x1", Namespace: "divert-system", OwnerReferences: owners}}
	}
	ds := func(uid string, deleting bool) *appsv1.DaemonSet {
		d := &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "divert-node", Namespace: "divert-system", UID: k8stypes.UID("ds-" + uid)}}
		if deleting {
			now := metav1.Now()
			d.DeletionTimestamp = &now
			d.Finalizers = []string{"foregroundDeletion"}
		}
		return d
	}
	owner := metav1.OwnerReference{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "divert-node", UID: "ds-1"}
	cases := []struct {
		name string
		objs []runtime.Object
		want bool
	}{
		{"restart or upgrade", []runtime.Object{agentPod(owner), ds("1", false)}, false},
		{"DaemonSet deleted", []runtime.Object{agentPod(owner)}, true},
		{"DaemonSet being deleted", []runtime.Object{agentPod(owner), ds("1", true)}, true},
		{"DaemonSet replaced", []runtime.Object{agentPod(owner), ds("2", false)}, false},
		{"not a DaemonSet's pod", []runtime.Object{agentPod()}, false},
		{"own pod unreadable", nil, false},
	}
	for _, c := range cases {
		got, why := Uninstalling(context.Background(), fake.NewClientset(c.objs...), "divert-system", "divert-node-x1")
		if got != c.want || why == "" {
			t.Errorf("%s: Uninstalling = %v (%q), want %v", c.name, got, why, c.want)
		}
	}
}
