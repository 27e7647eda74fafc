// The pod sandbox ("pause") process of a real node's containerd: no registry is reachable here, so the
// sandbox image is built locally from this one file (see realnode.py).
module finetune.io/devcluster/pause

go 1.24.0
