"""Local Kubernetes control plane (etcd, kube-apiserver, controller-manager, scheduler, kwok GPU nodes)
and a local S3 server, for tests and for people. See ``cluster.LocalCluster``, ``s3.LocalS3`` and
``python -m finetune_devcluster --help``."""

from .cluster import LocalCluster
from .s3 import LocalS3
from .tools import ensure

__all__ = ["LocalCluster", "LocalS3", "ensure"]
