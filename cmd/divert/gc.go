package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/meshdivert/divert/loader"
)

func newGCCmd(e env) *cobra.Command {
	var opts loader.Options
	var dry bool
	cmd := &cobra.Command{
		Use:   "gc [--bpffs PATH] [--dry-run]",
		Short: "Remove the pins of pods that are gone",
		Long: `When a pod goes away, the kernel detaches divert's programs from it by itself: a cgroup
link whose cgroup is removed, and an sk_lookup link whose network namespace is destroyed,
report no target any more (divert status marks the pod defunct and each such program
` + detachedNote + `). Their pins, and with
them the programs and maps, stay in bpffs until removed. gc removes every pod whose links
have lost a target; run it periodically on each node (a CronJob or the node agent's
reconcile loop). It never touches pods whose links are all attached.`,
		Args: cobra.NoArgs,
	}
	addBPFFSFlag(cmd.Flags(), &opts)
	cmd.Flags().BoolVarP(&dry, "dry-run", "n", false, "only list what would be removed")
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		if dry {
			ids, err := loader.List(opts)
			if err != nil {
				return err
			}
			for _, id := range ids {
				if gone, err := loader.Defunct(id, opts); err == nil && len(gone) > 0 {
					fmt.Fprintf(e.stdout, "would remove %s (%s detached by the kernel)\n", id, strings.Join(gone, ", "))
				}
			}
			return nil
		}
		removed, err := loader.GC(opts)
		for _, id := range removed {
			fmt.Fprintf(e.stdout, "removed %s\n", id)
		}
		if err == nil && len(removed) == 0 {
			fmt.Fprintln(e.stdout, "nothing to remove")
		}
		return err
	}
	return cmd
}
