"""finetune_devcluster.tools: lookup order, build-once under a lock, cache stamps, clear errors.

A fake ``go`` script stands in for the toolchain, so these run in a second without building anything."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from finetune_devcluster import tools


def _exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_go(tmp_path, monkeypatch):
    """PATH holds only a fake ``go`` that counts its runs and writes $GOBIN/faketool (after 0.5 s)."""
    bindir = tmp_path / "gobin"
    counter = tmp_path / "runs"
    _exe(
        bindir / "go",
        "#!/bin/sh\n"
        f'echo run >> "{counter}"\n'
        'if [ -n "$FAKE_GO_FAIL" ]; then echo "go: module example.com/x: reading https://proxy.golang.org: 410 Gone" >&2; exit 1; fi\n'
        "sleep 0.5\n"
        'printf "#!/bin/sh\\necho fake\\n" > "$GOBIN/faketool"; chmod +x "$GOBIN/faketool"\n',
    )
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FINETUNE_BIN_DIR", raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    bundle = tools.Bundle("fake", "v1.0.0", ("faketool",), tools.go_install(["example.com/x/cmd/faketool"], "v1.0.0"))
    monkeypatch.setitem(tools.BUNDLES, "fake", bundle)
    monkeypatch.setitem(tools.TOOLS, "faketool", bundle)
    return counter


def runs(counter: Path) -> int:
    return len(counter.read_text().splitlines()) if counter.exists() else 0


def test_builds_once_under_lock_then_reuses(fake_go, tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(tools.ensure("faketool"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = tmp_path / "cache" / "bin" / "fake-v1.0.0" / "faketool"
    assert results == [want] * 3
    assert runs(fake_go) == 1
    assert tools.ensure("faketool") == want and runs(fake_go) == 1
    assert tools.find("faketool") == want
    row = next(r for r in tools.describe() if r["tool"] == "faketool")
    assert row == {"tool": "faketool", "bundle": "fake-v1.0.0", "path": str(want), "state": "cached"}


def test_changed_recipe_rebuilds(fake_go, tmp_path):
    tools.ensure("faketool")
    stamp = tmp_path / "cache" / "bin" / "fake-v1.0.0" / ".stamp"
    stamp.write_text('{"recipe": "stale"}')
    assert tools.find("faketool") is None
    tools.ensure("faketool")
    assert runs(fake_go) == 2


def test_go_failure_reports_go_output(fake_go, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_GO_FAIL", "1")
    with pytest.raises(tools.ToolError) as e:
        tools.ensure("faketool")
    msg = str(e.value)
    assert "410 Gone" in msg and "example.com/x/cmd/faketool@v1.0.0" in msg
    # nothing half-built is left to be mistaken for a cache hit
    assert not (tmp_path / "cache" / "bin" / "fake-v1.0.0").exists()
    assert [p.name for p in (tmp_path / "cache" / "bin").iterdir() if not p.name.endswith(".lock")] == []


def test_missing_go_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no go here
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FINETUNE_BIN_DIR", raising=False)
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    with pytest.raises(tools.ToolError, match="Go toolchain not found on PATH"):
        tools.ensure("kwok")


def test_bin_dir_and_envtest_assets_override_without_go(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no go: an override must not need it
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    bin_dir, assets = tmp_path / "bin", tmp_path / "assets"
    _exe(bin_dir / "kwok", "#!/bin/sh\n")
    _exe(assets / "kube-apiserver", "#!/bin/sh\n")
    _exe(assets / "etcd", "#!/bin/sh\n")
    _exe(bin_dir / "etcd", "#!/bin/sh\n")
    monkeypatch.setenv("FINETUNE_BIN_DIR", str(bin_dir))
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    assert tools.ensure("kwok") == bin_dir / "kwok"
    assert tools.ensure("kube-apiserver") == assets / "kube-apiserver"
    assert tools.ensure("etcd") == bin_dir / "etcd"  # FINETUNE_BIN_DIR wins over KUBEBUILDER_ASSETS
    with pytest.raises(tools.ToolError, match="unknown tool"):
        tools.ensure("kube-router")


def test_cache_keyed_by_pinned_versions():
    assert tools.bundle_dir("k8s").name == f"k8s-{tools.K8S_VERSION}"
    assert tools.bundle_dir("kwok").name == f"kwok-{tools.KWOK_VERSION}"
    assert tools.bundle_dir("helm").name == f"helm-{tools.HELM_VERSION}"
    assert tools.bundle_dir("minio").name == f"minio-{tools.MINIO_VERSION}"
    assert tools.bundle_dir("kubelet").name == f"kubelet-{tools.K8S_VERSION}"
    assert tools.bundle_dir("pause").name == f"pause-{tools.PAUSE_VERSION}"
    assert set(tools.TOOLS) >= {
        "kube-apiserver", "kube-controller-manager", "kube-scheduler", "etcd", "kubectl", "kwok", "helm", "minio", "kueue"
    }
    assert tools.bundle_dir("kueue").name == f"kueue-{tools.KUEUE_VERSION}"
    # only a real node needs these: `build` without names (`make tools`) and ensure_all() leave them out
    assert set(tools.REALNODE_TOOLS) == {"kubelet", "kube-proxy", "pause", "coredns"} <= set(tools.TOOLS)
    assert set(tools.DEFAULT_TOOLS) == set(tools.TOOLS) - {"kubelet", "kube-proxy", "pause", "coredns"}
    assert os.path.isabs(tools.cache_dir())


def test_module_files_are_copied_from_the_module_cache_into_the_bundle(fake_go, tmp_path, monkeypatch):
    """``module_files``: what ``go mod download -json`` says is the module's folder is copied (and stamped)."""
    src = tmp_path / "modcache" / "example.com" / "x@v1.0.0" / "config" / "crd"
    src.mkdir(parents=True)
    (src / "a.yaml").write_text("kind: CustomResourceDefinition\n")
    (src / "a.yaml").chmod(0o444)  # as the module cache holds it
    go = tmp_path / "gobin" / "go"
    go.write_text(go.read_text().replace(
        "#!/bin/sh\n",
        '#!/bin/sh\nif [ "$1" = mod ]; then echo \'{"Dir": "%s"}\'; exit 0; fi\n' % (tmp_path / "modcache" / "example.com" / "x@v1.0.0"), 1))
    bundle = tools.Bundle("fake", "v1.0.0", ("faketool",), tools.go_install(["example.com/x/cmd/faketool"], "v1.0.0"),
                          module_files=(("example.com/x", "v1.0.0", "config/crd", "crds"),))
    assert bundle.recipe() != tools.BUNDLES["fake"].recipe()  # the files are part of the recipe
    monkeypatch.setitem(tools.BUNDLES, "fake", bundle)
    monkeypatch.setitem(tools.TOOLS, "faketool", bundle)
    d = tools.ensure_bundle("fake")
    assert (d / "crds" / "a.yaml").read_text() == "kind: CustomResourceDefinition\n"
    assert os.access(d / "crds" / "a.yaml", os.W_OK)
    assert tools.ensure("faketool") == d / "faketool" and runs(fake_go) == 1  # cached: no rebuild
