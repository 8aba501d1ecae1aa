package cgroups

// DirByID returns the directory under root (a cgroup2 mount) of the cgroup whose id is id:
// a cgroup's id is its directory's inode, and a BPF link reports its cgroup only by id.
func DirByID(root string, id uint64) (string, error) { return walkForInode(root, id, 64) }
