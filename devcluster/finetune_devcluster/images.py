"""The project's two images, built here from the repository's own Dockerfiles with buildah, no registry.

No container registry is reachable from this machine, so the upstream bases (``python:*-slim``,
``nvidia/cuda``) cannot be pulled. Each Dockerfile takes its base as a build ARG (``PYTHON_IMAGE``,
``CUDA_IMAGE``; the upstream image stays the default for users); here the base is a Debian bookworm
root filesystem made with ``debootstrap`` (Python 3.11, the interpreter constraints.txt was frozen with)
and this machine's CA certificates and pip configuration, so ``pip install`` inside the build goes
through the same proxy/mirror as ``make setup`` does.

Everything is cached by content under ``${FINETUNE_CACHE:-~/.cache/finetune-operator}/images``:

* ``base-<hash>/rootfs.tar`` - the debootstrap root filesystem; the hash covers the suite, the package
  list, the mirror and the CA/pip files copied in;
* ``<image>-<hash>.tar`` - the built image as a docker-archive, tagged ``localhost/finetune-<image>:<hash>``;
  the hash covers the Dockerfile, every file its ``COPY`` instructions name (read from the Dockerfile,
  so the list cannot drift), the base's hash and the build args. A rerun with nothing changed finds
  the archive and returns at once; buildah's own layer cache (``--layers``) keeps unchanged layers
  (the torch layer of the trainer image) when only sources change.

Loading into containerd is ``ctr images import`` of that archive (``RealNode`` does it at start, and
skips an image containerd already has): no registry process to keep running, no insecure-registry
configuration in containerd, and an image the kubelet finds locally is never pulled
(``imagePullPolicy: IfNotPresent``/``Never``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import tools

ROOT = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
MIRROR = os.environ.get("FINETUNE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# What the Dockerfiles' build stages need from a python:*-slim base: python (3.11) with venv and pip,
# CA certificates; passwd (groupadd/useradd) is part of minbase.
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
IGNORED_PARTS = ("__pycache__",)
IGNORED_SUFFIXES = (".pyc", ".pyo", ".pyd")


class ImageError(RuntimeError):
    """An image could not be built (the message carries the tool's output tail)."""


@dataclass(frozen=True)
class ImageSpec:
    name: str  # short name: operator, trainer
    dockerfile: Path
    base_arg: str  # the Dockerfile's build ARG naming its base image

    @property
    def repo(self) -> str:
        return f"localhost/finetune-{self.name}"


IMAGES = {
    "operator": ImageSpec("operator", ROOT / "operator" / "Dockerfile", "PYTHON_IMAGE"),
    "trainer": ImageSpec("trainer", ROOT / "trainer-image" / "Dockerfile", "CUDA_IMAGE"),
}


def _log(msg: str) -> None:
    print(f"[finetune-devcluster] {msg}", file=sys.stderr, flush=True)


def images_dir() -> Path:
    return tools.cache_dir() / "images"


def storage_args() -> list[str]:
    """buildah's storage: its own folder under the cache (kept between runs: the layer cache). overlay
    by default: vfs would store every layer as a full copy of the root filesystem (for the trainer
    image, several GB per layer); ``FINETUNE_BUILDAH_DRIVER=vfs`` where overlay cannot mount (e.g. a
    cache folder that is itself on overlayfs)."""
    driver = os.environ.get("FINETUNE_BUILDAH_DRIVER", "overlay")
    root = images_dir() / f"storage-{driver}"
    return ["--root", str(root / "root"), "--runroot", str(root / "run"), "--storage-driver", driver]


# ------------------------------------------------------------------------------------------- base
def _host_trust_files() -> list[Path]:
    """This machine's extra CA certificates and pip configuration, copied into the base."""
    files = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    if Path("/etc/pip.conf").is_file():
        files.append(Path("/etc/pip.conf"))
    return files


def base_hash() -> str:
    h = hashlib.sha256(json.dumps([SUITE, MIRROR, BASE_PACKAGES, "v1"]).encode())
    for p in _host_trust_files():
        h.update(str(p).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _run(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
    if proc.returncode != 0:
        raise ImageError(f"{what} failed (exit {proc.returncode}): {shlex.join(argv)}\n{proc.stdout[-6000:]}")
    return proc


def _need(exe: str) -> str:
    path = shutil.which(exe)
    if not path:
        raise ImageError(f"{exe} not found: run `make node-deps` (installs containerd, runc, CNI plugins, buildah, debootstrap)")
    return path


@dataclass
class _Lock:
    path: Path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w")
        fcntl.flock(self._fh, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self._fh.close()


def ensure_base_rootfs() -> Path:
    """The debootstrap root filesystem as a tar (built once per ``base_hash``)."""
    d = images_dir() / f"base-{base_hash()}"
    tar = d / "rootfs.tar"
    if tar.is_file():
        return tar
    with _Lock(images_dir() / ".base.lock"):
        if tar.is_file():
            return tar
        _need("debootstrap")
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        rootfs = Path(tempfile.mkdtemp(prefix="rootfs-", dir=d))
        _log(f"debootstrap {SUITE} ({', '.join(BASE_PACKAGES)}) into {rootfs} - takes a few minutes")
        try:
            _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs), MIRROR],
                 "debootstrap")
            for p in _host_trust_files():
                dst = rootfs / ("etc/pip.conf" if p.name == "pip.conf" else f"usr/local/share/ca-certificates/{p.name}")
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dst)
            _run(["chroot", str(rootfs), "update-ca-certificates"], "update-ca-certificates in the base")
            # python:*-slim has `python`; the operator Dockerfile calls it.
            (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in (rootfs / sub).glob("*"):
                    if f.is_file():
                        f.unlink()
            part = tar.with_suffix(".part")
            _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(part), "."], "tar of the base")
            part.replace(tar)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        _log(f"base rootfs ready in {time.monotonic() - t0:.0f}s: {tar}")
    return tar


def ensure_base_image() -> str:
    """The base as an image in buildah's storage; returns its name (passed as the Dockerfile's base ARG)."""
    ref = f"localhost/finetune-base:{base_hash()}"
    buildah = _need("buildah")
    if subprocess.run([buildah, *storage_args(), "inspect", "--type", "image", ref], capture_output=True).returncode == 0:
        return ref
    tar = ensure_base_rootfs()
    _bud_one_file(buildah, ref, tar, "rootfs.tar", 'FROM scratch\nADD rootfs.tar /\nENV LANG=C.UTF-8\nCMD ["/bin/bash"]\n',
                  "buildah bud of the base")
    return ref


def _bud_one_file(buildah: str, ref: str, source: Path, name: str, containerfile: str, what: str) -> None:
    """Build ``ref`` from a context holding one file (hard-linked when it can be: a rootfs tar is large)."""
    ctx = Path(tempfile.mkdtemp(prefix="ctx-", dir=images_dir()))
    try:
        try:
            os.link(source, ctx / name)
        except OSError:
            shutil.copy2(source, ctx / name)
        (ctx / "Containerfile").write_text(containerfile)
        _run([buildah, *storage_args(), "bud", "--isolation", "chroot", "-t", ref, str(ctx)], what)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


# ------------------------------------------------------------------------------------------ images
def copy_sources(dockerfile: Path) -> list[str]:
    """The context paths the Dockerfile's ``COPY`` instructions read (``COPY --from=`` excluded)."""
    lines, cur = [], ""
    for raw in dockerfile.read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        cur += " " + s.rstrip("\\")
        if not s.endswith("\\"):
            lines.append(cur.strip())
            cur = ""
    out = []
    for line in lines:
        parts = shlex.split(line)
        if parts[0].upper() not in ("COPY", "ADD"):
            continue
        args = [a for a in parts[1:] if not a.startswith("--")]
        if any(a.startswith("--from") for a in parts[1:]):
            continue
        out += args[:-1]
    return out


def _files(path: Path):
    if path.is_file():
        yield path
        return
    for p in sorted(path.rglob("*")):
        if p.is_file() and not any(x in p.parts for x in IGNORED_PARTS) and p.suffix not in IGNORED_SUFFIXES:
            yield p


def image_hash(spec: ImageSpec, base: str, build_args: dict[str, str] | None = None, root: Path = ROOT) -> str:
    """Content hash of what the image is built from: Dockerfile, every COPY'd file (``root`` is the
    build context), base, build args."""
    h = hashlib.sha256(json.dumps([spec.name, base, sorted((build_args or {}).items())]).encode())
    h.update(spec.dockerfile.read_bytes())
    for src in copy_sources(spec.dockerfile):
        for f in _files(root / src):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class BuiltImage:
    name: str
    ref: str  # localhost/finetune-<name>:<hash>
    archive: Path  # docker-archive with that tag
    seconds: float  # build time (0 when found in the cache)


def archive_path(name: str, digest: str) -> Path:
    return images_dir() / f"{name}-{digest}.tar"


def build(name: str, build_args: dict[str, str] | None = None) -> BuiltImage:
    """Build (or find in the cache) one image and return its reference and archive."""
    spec = IMAGES[name]
    t0 = time.monotonic()
    base = ensure_base_image()
    h = image_hash(spec, base, build_args)
    ref = f"{spec.repo}:{h}"
    archive = archive_path(name, h)
    if archive.is_file():
        return BuiltImage(name, ref, archive, 0.0)
    buildah = _need("buildah")
    with _Lock(images_dir() / f".{name}.lock"):
        if archive.is_file():
            return BuiltImage(name, ref, archive, 0.0)
        _log(f"building {ref} from {spec.dockerfile.relative_to(ROOT)} (base {base})")
        args = {spec.base_arg: base, **(build_args or {})}
        argv = [buildah, *storage_args(), "bud", "--isolation", "chroot", "--layers", "--pull-never",
                "-f", str(spec.dockerfile), "-t", ref]
        for k, v in args.items():
            argv += ["--build-arg", f"{k}={v}"]
        _run([*argv, str(ROOT)], f"building {name} image", cwd=ROOT)
        part = archive.with_name(archive.name + ".part")
        part.unlink(missing_ok=True)
        _run([buildah, *storage_args(), "push", ref, f"docker-archive:{part}:{ref}"], f"exporting {ref}")
        part.replace(archive)
        for old in images_dir().glob(f"{name}-*.tar"):  # keep only the newest archive of an image
            if old != archive:
                old.unlink(missing_ok=True)
    took = time.monotonic() - t0
    _log(f"built {ref} in {took:.0f}s -> {archive}")
    return BuiltImage(name, ref, archive, took)


def find(name: str) -> BuiltImage | None:
    """The cached build of an image for the current sources, or None (never builds)."""
    try:
        base = f"localhost/finetune-base:{base_hash()}"
        h = image_hash(IMAGES[name], base)
    except OSError:
        return None
    archive = archive_path(name, h)
    return BuiltImage(name, f"{IMAGES[name].repo}:{h}", archive, 0.0) if archive.is_file() else None


PAUSE_REF = f"localhost/finetune-pause:{tools.PAUSE_VERSION}"
COREDNS_REF = f"localhost/finetune-coredns:{tools.COREDNS_VERSION}"


def _one_binary_image(name: str, ref: str, containerfile: str) -> BuiltImage:
    """An image of one static binary (the tool ``name``, built by tools.py) as a docker-archive, cached
    by the binary's hash."""
    binary = tools.ensure(name)
    h = hashlib.sha256(binary.read_bytes()).hexdigest()[:16]
    archive = archive_path(name, h)
    if archive.is_file():
        return BuiltImage(name, ref, archive, 0.0)
    buildah = _need("buildah")
    t0 = time.monotonic()
    with _Lock(images_dir() / f".{name}.lock"):
        if archive.is_file():
            return BuiltImage(name, ref, archive, 0.0)
        _bud_one_file(buildah, ref, binary, name, containerfile, f"building the {name} image")
        part = archive.with_name(archive.name + ".part")
        part.unlink(missing_ok=True)
        _run([buildah, *storage_args(), "push", ref, f"docker-archive:{part}:{ref}"], f"exporting the {name} image")
        part.replace(archive)
        for old in images_dir().glob(f"{name}-*.tar"):
            if old != archive:
                old.unlink(missing_ok=True)
    return BuiltImage(name, ref, archive, time.monotonic() - t0)


def ensure_pause_archive() -> BuiltImage:
    """The pod sandbox image (one static binary, gotools/pause) as a docker-archive."""
    return _one_binary_image("pause", PAUSE_REF, 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n')


def ensure_coredns_archive() -> BuiltImage:
    """The cluster DNS image (one static binary, gotools/coredns) as a docker-archive: like upstream's
    coredns image, the binary alone, non-root (65532, upstream's "nonroot")."""
    return _one_binary_image("coredns", COREDNS_REF,
                             'FROM scratch\nCOPY coredns /coredns\nUSER 65532:65532\nEXPOSE 53 53/udp\nENTRYPOINT ["/coredns"]\n')
