package node

import (
	"context"
	"errors"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stypes "k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
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

// helm uninstall deletes the DaemonSet and then the Role that lets the agent read it,
// before the agent's pod is told to stop: the watch opened at start still tells an
// uninstall. A restart, a replaced DaemonSet (readable) and an unreadable API with no
// deletion seen still keep divert-cni chained.
func TestOwnerWatch(t *testing.T) {
	owner := metav1.OwnerReference{APIVersion: "apps/v1", Kind: "DaemonSet", Name: "divert-node", UID: "ds-1"}
	agentPod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "divert-node-x1", Namespace: "divert-system", OwnerReferences: []metav1.OwnerReference{owner}}}
	ds := func(uid string) *appsv1.DaemonSet {
		return &appsv1.DaemonSet{ObjectMeta: metav1.ObjectMeta{Name: "divert-node", Namespace: "divert-system", UID: k8stypes.UID(uid)}}
	}
	forbid := func(c *fake.Clientset) {
		c.PrependReactor("get", "daemonsets", func(k8stesting.Action) (bool, runtime.Object, error) {
			return true, nil, apierrors.NewForbidden(schema.GroupResource{Group: "apps", Resource: "daemonsets"}, "divert-node", errors.New("no Role"))
		})
	}
	cases := []struct {
		name  string
		event func(ctx context.Context, c *fake.Clientset) error
		want  bool
	}{
		{"restart: the DaemonSet stays", func(context.Context, *fake.Clientset) error { return nil }, false},
		{"uninstall: DaemonSet deleted, then its Role", func(ctx context.Context, c *fake.Clientset) error {
			err := c.AppsV1().DaemonSets("divert-system").Delete(ctx, "divert-node", metav1.DeleteOptions{})
			forbid(c)
			return err
		}, true},
		{"unreadable, nothing deleted", func(_ context.Context, c *fake.Clientset) error { forbid(c); return nil }, false},
		{"replaced, readable", func(ctx context.Context, c *fake.Clientset) error {
			if err := c.AppsV1().DaemonSets("divert-system").Delete(ctx, "divert-node", metav1.DeleteOptions{}); err != nil {
				return err
			}
			_, err := c.AppsV1().DaemonSets("divert-system").Create(ctx, ds("ds-2"), metav1.CreateOptions{})
			return err
		}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			c := fake.NewClientset(agentPod, ds("ds-1"))
			w, err := WatchOwner(ctx, c, "divert-system", "divert-node-x1")
			if err != nil {
				t.Fatal(err)
			}
			if err := tc.event(ctx, c); err != nil {
				t.Fatal(err)
			}
			dctx, dcancel := context.WithTimeout(ctx, 2*time.Second)
			defer dcancel()
			got, why := w.Uninstalling(dctx)
			if got != tc.want || why == "" {
				t.Errorf("Uninstalling = %v (%q), want %v", got, why, tc.want)
			}
		})
	}
}
