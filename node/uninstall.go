package node

import (
	"context"
	"fmt"
	"sync"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
)

// Uninstalling tells, as the agent pod shuts down, whether divert is being removed from
// the node (its DaemonSet is gone or being deleted) or the agent is only being restarted
// or upgraded (the DaemonSet stays and will start a new agent), and why. Only removal may
// take divert-cni out of the conflist: on a restart the chained plugin keeps new pods from
// starting uncaptured until the new agent is up. When it cannot tell, it says no (the
// safe side: new pods wait rather than run uncaptured), as istio-cni does.
func Uninstalling(ctx context.Context, client kubernetes.Interface, namespace, podName string) (bool, string) {
	remove, why, _ := uninstalling(ctx, client, namespace, podName)
	return remove, why
}

// uninstalling is Uninstalling, with unreadable (the answer is a guess: the API refused or
// failed a read).
func uninstalling(ctx context.Context, client kubernetes.Interface, namespace, podName string) (remove bool, why string, unreadable bool) {
	pod, err := client.CoreV1().Pods(namespace).Get(ctx, podName, metav1.GetOptions{})
	if err != nil {
		return false, fmt.Sprintf("cannot read the agent's own pod %s/%s (%v)", namespace, podName, err), true
	}
	for _, ref := range pod.OwnerReferences {
		if ref.Kind != "DaemonSet" {
			continue
		}
		ds, err := client.AppsV1().DaemonSets(namespace).Get(ctx, ref.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return true, "DaemonSet " + ref.Name + " is gone", false
		case err != nil:
			return false, fmt.Sprintf("cannot read DaemonSet %s (%v)", ref.Name, err), true
		case ds.UID != ref.UID:
			// Deleted and created again: the new DaemonSet's agent chains the plugin.
			return false, "DaemonSet " + ref.Name + " was replaced", false
		case ds.DeletionTimestamp != nil:
			return true, "DaemonSet " + ref.Name + " is being deleted", false
		default:
			return false, "DaemonSet " + ref.Name + " stays (restart or upgrade)", false
		}
	}
	return false, "the agent pod is not run by a DaemonSet", false
}

// OwnerWatch follows the agent's DaemonSet from the agent's start, so that its deletion is
// known at shutdown even when the permission to read it is gone by then: helm uninstall
// (and kubectl delete -f) deletes the DaemonSet and, milliseconds later, the Role that
// lets the agent read it, before the agent's pod gets SIGTERM. A watch opened while the
// Role existed keeps delivering events.
type OwnerWatch struct {
	client    kubernetes.Interface
	namespace string
	podName   string

	mu       sync.Mutex
	name     string    // the DaemonSet
	uid      types.UID // the one that runs this agent (a replacement is another)
	gone     string    // why it is being removed, once the watch saw it
	changed  chan struct{}
	watching bool
}

// WatchOwner finds the agent pod's DaemonSet and watches it until ctx ends. Without an
// owning DaemonSet it watches nothing, and Uninstalling asks the API as before.
func WatchOwner(ctx context.Context, client kubernetes.Interface, namespace, podName string) (*OwnerWatch, error) {
	w := &OwnerWatch{client: client, namespace: namespace, podName: podName, changed: make(chan struct{})}
	pod, err := client.CoreV1().Pods(namespace).Get(ctx, podName, metav1.GetOptions{})
	if err != nil {
		return w, fmt.Errorf("read the agent's own pod %s/%s: %w", namespace, podName, err)
	}
	for _, ref := range pod.OwnerReferences {
		if ref.Kind == "DaemonSet" {
			w.name, w.uid = ref.Name, ref.UID
		}
	}
	if w.name == "" {
		return w, nil
	}
	// Opened here, not in the goroutine: once WatchOwner returns, a deletion is seen.
	wi, err := w.open(ctx)
	if err != nil {
		return w, fmt.Errorf("watch DaemonSet %s: %w", w.name, err)
	}
	w.watching = true
	go w.follow(ctx, wi)
	return w, nil
}

func (w *OwnerWatch) open(ctx context.Context) (watch.Interface, error) {
	return w.client.AppsV1().DaemonSets(w.namespace).Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + w.name})
}

// follow records the DaemonSet's deletion; a watch the server ends is opened again (while
// the agent may still read its DaemonSet).
func (w *OwnerWatch) follow(ctx context.Context, wi watch.Interface) {
	for {
		for ev := range wi.ResultChan() {
			ds, ok := ev.Object.(*appsv1.DaemonSet)
			if !ok || ds.UID != w.uid {
				continue
			}
			switch {
			case ev.Type == watch.Deleted:
				w.saw("DaemonSet " + w.name + " was deleted")
			case ds.DeletionTimestamp != nil:
				w.saw("DaemonSet " + w.name + " is being deleted")
			}
		}
		wi.Stop()
		for {
			if ctx.Err() != nil {
				return
			}
			var err error
			if wi, err = w.open(ctx); err == nil {
				break
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
		}
	}
}

func (w *OwnerWatch) saw(why string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.gone == "" {
		w.gone = why
		close(w.changed)
	}
}

// Uninstalling is the package's Uninstalling while the API can be read (it alone tells a
// replaced DaemonSet from a deleted one). When it cannot (the Role went with the
// DaemonSet), a deletion the watch saw, or sees before ctx ends, is an uninstall.
func (w *OwnerWatch) Uninstalling(ctx context.Context) (bool, string) {
	remove, why, unreadable := uninstalling(ctx, w.client, w.namespace, w.podName)
	w.mu.Lock()
	watching := w.watching
	w.mu.Unlock()
	if !unreadable || !watching {
		return remove, why
	}
	select {
	case <-w.changed:
		w.mu.Lock()
		defer w.mu.Unlock()
		return true, w.gone + " (watched; " + why + ")"
	case <-ctx.Done():
		return false, why
	}
}
