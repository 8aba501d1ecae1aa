package e2e

// Node mode's scenarios are not written yet (issue 9). They belong in a TestNodeMode here
// (no placeholder test is kept: CI runs no skipped tests). What they need: node mode (DESIGN.md §7: the `divert node` DaemonSet agent
// plus the `divert-cni` chained plugin, deploy/node/divert-node.yaml), which is written
// separately. Its scenarios go here, against the same cluster and judged by the same
// check() as the init-container rows:
//
//   - deploy: deploy/node/divert-node.yaml with image divertRef (images() in e2e_test.go
//     builds it; add the divert-cni binary to its layer) and imagePullPolicy: Never, its
//     hostPaths pointed at this cluster's own directories, all under the state directory:
//     /opt/cni/bin -> suite.c.CNIBinDir, /etc/cni/net.d -> suite.c.CNIConfDir,
//     /var/run/netns -> suite.c.NetNSDir, /sys/fs/bpf -> suite.c.BPFFS (so installing the
//     plugin never touches the host's /etc/cni or /opt/cni, and pins die with the cluster).
//     There is no kube-proxy, so the kubernetes Service's ClusterIP leads nowhere: give the
//     agent KUBERNETES_SERVICE_HOST=suite.c.NodeIP and KUBERNETES_SERVICE_PORT=cluster.APIPort
//     (the apiserver's certificate covers that address). The cgroup2 mount is at
//     /sys/fs/cgroup/unified on these machines, as the manifest assumes.
//   - a meshed pod (selected by its annotations, no init container) captured:
//     outbound(t, pod) and inbound(t, pod, addr(pod, appPort));
//   - an unmeshed pod untouched: a dial from it reaches plain directly (one hop);
//   - the agent restarted while a client loops: no connection escapes the proxy;
//   - the pod deleted: its pins under suite.c.BPFFS/divert/<uid> are gone.
