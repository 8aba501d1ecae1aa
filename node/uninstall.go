package node

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Uninstalling tells, as the agent pod shuts down, whether divert is being removed from
// the node (its DaemonSet is gone or being deleted) or the agent is only being restarted
// or upgraded (the DaemonSet stays and will start a new agent), and why. Only removal may
// take divert-cni out of the conflist: on a restart the chained plugin keeps new pods from
// starting uncaptured until the new agent is up. When it cannot tell, it says no (the
// safe side: new pods wait rather than run uncaptured), as istio-cni does.
func Uninstalling(ctx context.Context, client kubernetes.Interface, namespace, podName string) (bool, string) {
	pod, err := client.CoreV1().Pods(namespace).Get(ctx, podName, metav1.GetOptions{})
	if err != nil {
		return false, fmt.Sprintf("cannot read the agent's own pod %s/%s (%v)", namespace, podName, err)
	}
	for _, ref := range pod.OwnerReferences {
		if ref.Kind != "DaemonSet" {
			continue
		}
		ds, err := client.AppsV1().DaemonSets(namespace).Get(ctx, ref.Name, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			return true, "DaemonSet " + ref.Name + " is gone"
		case err != nil:
			return false, fmt.Sprintf("cannot read DaemonSet %s (%v)", ref.Name, err)
		case ds.UID != ref.UID:
			// Deleted and created again: the new DaemonSet's agent chains the plugin.
			return false, "DaemonSet " + ref.Name + " was replaced"
		case ds.DeletionTimestamp != nil:
			return true, "DaemonSet " + ref.Name + " is being deleted"
		default:
			return false, "DaemonSet " + ref.Name + " stays (restart or upgrade)"
		}
	}
	return false, "the agent pod is not run by a DaemonSet"
}
