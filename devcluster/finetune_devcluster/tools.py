"""Pinned binaries for the local control plane, built from source with Go and cached outside the repo.

``ensure(name)`` returns the path of one executable, looking in this order:

1. ``$FINETUNE_BIN_DIR/<name>`` (a folder of prebuilt binaries, e.g. filled by ``build --into``),
2. ``$KUBEBUILDER_ASSETS/<name>`` (the envtest layout: kube-apiserver, etcd, kubectl),
3. the cache ``${FINETUNE_CACHE:-~/.cache/finetune-operator}/bin/<bundle>-<version>/<name>``,
4. otherwise it builds the whole bundle the tool belongs to into the cache and returns it.

Tools that come out of one Go module are built by one ``go build`` invocation (a *bundle*), so they
share compilation and linking runs in parallel: the control plane (kube-apiserver,
kube-controller-manager, kube-scheduler, kubectl and etcd) from ``gotools/k8s``; the kubelet of a real
node (realnode.py) from ``gotools/kubelet`` (same versions), as its own bundle so only a real node pays for it; kwok, helm, minio
and the Kueue manager with ``go install <module>@<version>``. A bundle may also carry files from its
pinned module's source (``module_files``: Kueue's CRDs and webhook configurations, in ``ensure_bundle("kueue") / "crds"`` and ``/ "webhook"``). A build holds an exclusive file lock on the bundle, so parallel
pytest workers or CLI calls build it once; the others wait and reuse it. A finished bundle folder has
a ``.stamp`` naming its recipe (versions, flags, hash of go.mod/go.sum); a folder with a missing or
different stamp is rebuilt.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

K8S_VERSION = "v1.33.13"
ETCD_VERSION = "v3.5.21"
KWOK_VERSION = "v0.7.0"
HELM_VERSION = "v3.19.5"
# MinIO publishes no semver tags; this is the module proxy's pseudo-version of master on 2026-02-12.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"
# Kueue's go.mod has no replace directives, so `go install ...@version` builds it like kwok; its k8s.io
# libraries (v0.35) are its own and need no module of ours. It runs against the v1.33 control plane.
KUEUE_VERSION = "v0.17.0"

GOTOOLS = Path(__file__).resolve().parent / "gotools"


class ToolError(RuntimeError):
    """A binary could not be found or built. The message carries the Go output."""


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    tools: tuple[str, ...]
    # (argv, cwd or None) for each go command; output lands in $OUTDIR, which _build substitutes.
    commands: Callable[[Path], list[tuple[list[str], Path | None]]] = field(compare=False)
    # renames applied in the output folder after the build (go names a .../server/v3 binary "server")
    renames: tuple[tuple[str, str], ...] = ()
    # extra recipe input (files whose content changes the build)
    inputs: tuple[Path, ...] = ()
    # (module, version, folder in the module, folder in the bundle): files copied from the pinned module's
    # source (as the Go module cache holds it) into the bundle after the build, e.g. Kueue's CRDs
    module_files: tuple[tuple[str, str, str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"

    def recipe(self) -> str:
        h = hashlib.sha256()
        argvs = [argv for argv, _cwd in self.commands(Path("$OUTDIR"))]
        parts: list = [self.key, self.tools, self.renames, argvs]
        if self.module_files:  # only then: the other bundles' recipes (and so their caches) stay as they were
            parts.append(self.module_files)
        h.update(json.dumps(parts).encode())
        for p in self.inputs:
            h.update(p.name.encode())
            h.update(p.read_bytes() if p.exists() else b"<missing>")
        return h.hexdigest()[:16]


_COMMON = ["-trimpath"]


def _k8s_ldflags() -> str:
    major, minor = K8S_VERSION.lstrip("v").split(".")[:2]
    pairs = {
        "gitVersion": K8S_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "gitCommit": "0000000000000000000000000000000000000000",
        "buildDate": "1970-01-01T00:00:00Z",
    }
    xs = [f"-X k8s.io/{pkg}.{k}={v}" for pkg in ("component-base/version", "client-go/pkg/version") for k, v in pairs.items()]
    return " ".join(["-s", "-w", *xs])


def _k8s_cmds(out: Path) -> list[tuple[list[str], Path | None]]:
    return [
        (
            [
                "go", "build", *_COMMON, f"-ldflags={_k8s_ldflags()}", "-o", f"{out}/",
                "k8s.io/kubernetes/cmd/kube-apiserver",
                "k8s.io/kubernetes/cmd/kube-controller-manager",
                "k8s.io/kubernetes/cmd/kube-scheduler",
                "k8s.io/kubernetes/cmd/kubectl",
                "go.etcd.io/etcd/server/v3",
            ],
            GOTOOLS / "k8s",
        )
    ]


def _kubelet_cmds(out: Path) -> list[tuple[list[str], Path | None]]:
    return [(["go", "build", *_COMMON, f"-ldflags={_k8s_ldflags()}", "-o", f"{out}/", "k8s.io/kubernetes/cmd/kubelet",
              "k8s.io/kubernetes/cmd/kube-proxy"], GOTOOLS / "kubelet")]


# CoreDNS for a real node's cluster DNS: built from gotools/coredns (coremain with only the plugins the
# node's Corefile uses: errors, log, health, ready, template, kubernetes, cache, loadbalance), not the whole
# `go install github.com/coredns/coredns@...`, whose plugin set drags in every cloud DNS SDK.
COREDNS_VERSION = "v1.15.0"


def _coredns_cmds(out: Path) -> list[tuple[list[str], Path | None]]:
    ldflags = f"-s -w -X github.com/coredns/coredns/coremain.GitCommit={COREDNS_VERSION}"
    return [(["go", "build", *_COMMON, f"-ldflags={ldflags}", "-o", f"{out}/coredns", "."], GOTOOLS / "coredns")]


PAUSE_VERSION = "v1"  # of gotools/pause (no upstream version: our own file)


def _pause_cmds(out: Path) -> list[tuple[list[str], Path | None]]:
    return [(["go", "build", *_COMMON, "-ldflags=-s -w", "-o", f"{out}/pause", "."], GOTOOLS / "pause")]


def go_install(pkgs: Iterable[str], version: str, ldflags: str = "-s -w") -> Callable[[Path], list]:
    """A bundle's commands for tools that build with ``go install <pkg>@<version>`` (no go.mod of ours)."""

    def cmds(out: Path) -> list[tuple[list[str], Path | None]]:
        # GOBIN is set by _build; go install with @version runs outside any module.
        return [(["go", "install", *_COMMON, f"-ldflags={ldflags}", *[f"{p}@{version}" for p in pkgs]], None)]

    return cmds


BUNDLES: dict[str, Bundle] = {
    b.name: b
    for b in (
        Bundle(
            "k8s",
            K8S_VERSION,
            ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl", "etcd"),
            _k8s_cmds,
            renames=(("server", "etcd"),),
            inputs=(GOTOOLS / "k8s" / "go.mod", GOTOOLS / "k8s" / "go.sum"),
        ),
        # Only a real node (realnode.py) needs them, so they are their own bundle, from their own module
        # (gotools/kubelet: same k8s.io/kubernetes version and replacements as gotools/k8s, checked by
        # tests/unit/devcluster), built on first use and not by `make tools`; same ldflags.
        Bundle(
            "kubelet",
            K8S_VERSION,
            ("kubelet", "kube-proxy"),
            _kubelet_cmds,
            inputs=(GOTOOLS / "kubelet" / "go.mod", GOTOOLS / "kubelet" / "go.sum"),
        ),
        Bundle("pause", PAUSE_VERSION, ("pause",), _pause_cmds,
               inputs=(GOTOOLS / "pause" / "go.mod", GOTOOLS / "pause" / "main.go")),
        Bundle("coredns", COREDNS_VERSION, ("coredns",), _coredns_cmds,
               inputs=(GOTOOLS / "coredns" / "go.mod", GOTOOLS / "coredns" / "go.sum", GOTOOLS / "coredns" / "main.go")),
        Bundle(
            "kwok",
            KWOK_VERSION,
            ("kwok",),
            go_install(["sigs.k8s.io/kwok/cmd/kwok"], KWOK_VERSION, f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={KWOK_VERSION}"),
        ),
        Bundle(
            "helm",
            HELM_VERSION,
            ("helm",),
            go_install(
                ["helm.sh/helm/v3/cmd/helm"],
                HELM_VERSION,
                f"-s -w -X helm.sh/helm/v3/internal/version.version={HELM_VERSION}"
                " -X helm.sh/helm/v3/internal/version.metadata="
                " -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
                # as helm's own Makefile does: the Kubernetes version `helm template`/`lint` assume
                # (without it, v1.20, which fails the chart's kubeVersion: >=1.28)
                f" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={K8S_VERSION.split('.')[1]}"
                f" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor={K8S_VERSION.split('.')[1]}",
            ),
        ),
        Bundle("minio", MINIO_VERSION, ("minio",), go_install(["github.com/minio/minio"], MINIO_VERSION)),
        # The Kueue manager (kueue.py LocalKueue) with its CRDs and webhook configurations, copied from the
        # same module's source (what Kueue's own kustomize install starts from).
        Bundle(
            "kueue",
            KUEUE_VERSION,
            ("kueue",),
            go_install(
                ["sigs.k8s.io/kueue/cmd/kueue"],
                KUEUE_VERSION,
                f"-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion={KUEUE_VERSION}"
                " -X sigs.k8s.io/kueue/pkg/version.GitCommit=unknown -X sigs.k8s.io/kueue/pkg/version.BuildDate=unknown",
            ),
            module_files=(
                ("sigs.k8s.io/kueue", KUEUE_VERSION, "config/components/crd/bases", "crds"),
                ("sigs.k8s.io/kueue", KUEUE_VERSION, "config/components/webhook", "webhook"),
            ),
        ),
    )
}
TOOLS: dict[str, Bundle] = {t: b for b in BUNDLES.values() for t in b.tools}
# Only a real node needs these; `build` without names (`make tools`) leaves them out.
REALNODE_TOOLS = ("kubelet", "kube-proxy", "pause", "coredns")
DEFAULT_TOOLS = tuple(t for t in TOOLS if t not in REALNODE_TOOLS)


def cache_dir() -> Path:
    return Path(os.environ.get("FINETUNE_CACHE") or Path.home() / ".cache" / "finetune-operator").expanduser()


def bundle_dir(bundle: str | Bundle) -> Path:
    b = BUNDLES[bundle] if isinstance(bundle, str) else bundle
    return cache_dir() / "bin" / b.key


def _executable(p: Path) -> bool:
    return p.is_file() and os.access(p, os.X_OK)


def _override(name: str) -> Path | None:
    for var in ("FINETUNE_BIN_DIR", "KUBEBUILDER_ASSETS"):
        d = os.environ.get(var)
        if d and _executable(Path(d).expanduser() / name):
            return Path(d).expanduser() / name
    return None


def _cached(b: Bundle) -> bool:
    d = bundle_dir(b)
    stamp = d / ".stamp"
    try:
        ok = json.loads(stamp.read_text()).get("recipe") == b.recipe()
    except (OSError, ValueError):
        return False
    return ok and all(_executable(d / t) for t in b.tools)


def _log(msg: str) -> None:
    print(f"[finetune-devcluster] {msg}", file=sys.stderr, flush=True)


def _go() -> str:
    go = shutil.which("go")
    if not go:
        raise ToolError(
            "Go toolchain not found on PATH: the local control plane is built from source with Go >= 1.24. "
            "Install Go (https://go.dev/dl/), or point FINETUNE_BIN_DIR / KUBEBUILDER_ASSETS at prebuilt "
            "binaries (kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok, helm, minio, kueue)."
        )
    return go


def _build(b: Bundle, verbose: bool) -> None:
    go = _go()
    final = bundle_dir(b)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{b.key}.tmp-", dir=final.parent))
    env = dict(os.environ)
    env["GOBIN"] = str(tmp)
    env["CGO_ENABLED"] = "0"  # static binaries; no C toolchain needed
    env["GOFLAGS"] = "-buildvcs=false"  # a user's -mod=vendor etc. must not leak into pinned builds
    env["GOWORK"] = "off"  # nor a go.work above the module
    t0 = time.monotonic()
    _log(f"building {b.key} ({', '.join(b.tools)}) into {final} - a cold build takes several minutes")
    try:
        for argv, cwd in b.commands(tmp):
            argv = [go, *argv[1:]]
            try:
                proc = subprocess.run(
                    argv,
                    cwd=cwd,
                    env=env,
                    stdout=None if verbose else subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
            except OSError as e:
                raise ToolError(f"could not run {argv[0]}: {e}") from e
            if proc.returncode != 0:
                out = (proc.stdout or "(output shown above)")[-6000:]
                raise ToolError(
                    f"building {b.key} failed (exit {proc.returncode}).\n"
                    f"command: {' '.join(argv)}\ncwd: {cwd or os.getcwd()}\n"
                    f"GOPROXY={_goenv(go, 'GOPROXY')}\n--- go output (tail) ---\n{out}"
                )
        for src, dst in b.renames:
            if (tmp / src).exists():
                (tmp / src).replace(tmp / dst)
        for module, version, src, dst in b.module_files:
            shutil.copytree(_module_dir(go, env, module, version, cwd=tmp) / src, tmp / dst)
            for f in [tmp / dst, *(tmp / dst).rglob("*")]:
                f.chmod(0o755 if f.is_dir() else 0o644)  # the module cache's files are read-only
        missing = [t for t in b.tools if not _executable(tmp / t)]
        if missing:
            raise ToolError(f"building {b.key}: go succeeded but did not produce {missing} in {tmp}: {os.listdir(tmp)}")
        took = time.monotonic() - t0
        (tmp / ".stamp").write_text(
            json.dumps({"recipe": b.recipe(), "bundle": b.key, "built": time.time(), "seconds": round(took, 1)})
        )
        tmp.chmod(0o755)
        if final.exists():
            old = final.with_name(f".{b.key}.old-{os.getpid()}")
            final.replace(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.replace(final)
        _log(f"built {b.key} in {took:.0f}s")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _module_dir(go: str, env: dict[str, str], module: str, version: str, cwd: Path) -> Path:
    """The source folder of ``module@version`` in the Go module cache (downloaded if not there yet);
    run in ``cwd`` (no go.mod there), so no module of ours is involved."""
    argv = [go, "mod", "download", "-json", f"{module}@{version}"]
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        info = {}
    if proc.returncode != 0 or not info.get("Dir"):
        raise ToolError(f"{' '.join(argv)} failed (exit {proc.returncode}): {info.get('Error') or proc.stderr[-2000:]}")
    return Path(info["Dir"])


def _goenv(go: str, var: str) -> str:
    try:
        return subprocess.run([go, "env", var], capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:  # noqa: BLE001 - only decorates an error message
        return "?"


def ensure_bundle(bundle: str, verbose: bool = False) -> Path:
    """Build (once, under a file lock) and return the cache folder of a bundle."""
    b = BUNDLES[bundle]
    d = bundle_dir(b)
    if _cached(b):
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    lock = d.parent / f".{b.key}.lock"
    with open(lock, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log(f"waiting for another process building {b.key}")
            fcntl.flock(fh, fcntl.LOCK_EX)
        if not _cached(b):
            _build(b, verbose)
    return d


def find(name: str) -> Path | None:
    """Like ``ensure`` but never builds: the override or cached binary, else None."""
    b = TOOLS.get(name)
    if b is None:
        return None
    found = _override(name)
    if found:
        return found
    return bundle_dir(b) / name if _cached(b) else None


def ensure(name: str, verbose: bool = False) -> Path:
    """Path to the executable ``name`` (see the module docstring for the lookup order)."""
    if name not in TOOLS:
        raise ToolError(f"unknown tool {name!r}; known: {sorted(TOOLS)}")
    found = _override(name)
    if found:
        return found
    return ensure_bundle(TOOLS[name].name, verbose) / name


def ensure_all(names: Iterable[str] | None = None, verbose: bool = False) -> dict[str, Path]:
    """Ensure several tools (default: every tool but a real node's); each bundle is built at most once."""
    return {n: ensure(n, verbose) for n in (names or DEFAULT_TOOLS)}


def describe() -> list[dict[str, str]]:
    """One row per tool: name, version, where it would come from, whether it is ready."""
    rows = []
    for name, b in TOOLS.items():
        o = _override(name)
        rows.append(
            {
                "tool": name,
                "bundle": b.key,
                "path": str(o or bundle_dir(b) / name),
                "state": "override" if o else ("cached" if _cached(b) else "not built"),
            }
        )
    return rows
