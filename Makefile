# finetune-operator — developer entry points. `make demo` and `make test` are all a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
PYTEST_ARGS ?=

.PHONY: setup tools node-deps images realnode-tools crds demo down test test-realnode test-unit clean

## setup: create .venv and install the project with its test extras (pinned by constraints.txt)
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[test]'
	touch $@

## tools: build (once, cached outside the repo) kube-apiserver, controller-manager, scheduler, etcd, kwok, helm, minio, kueue;
## install Debian's prometheus if missing
tools: setup
	$(PY) -m finetune_devcluster build
	@command -v prometheus >/dev/null || { echo "installing prometheus (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

## node-deps: the Debian packages a real node and `make images` need (containerd, runc, CNI plugins,
## buildah, debootstrap); installed once, skipped when every one is present
NODE_PACKAGES := containerd runc containernetworking-plugins buildah debootstrap iproute2
node-deps:
	@missing=$$(for p in $(NODE_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then echo "installing Debian packages:" $$missing; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; fi

## images: build both images (IMAGES=operator or IMAGES=trainer for one) from the repo's Dockerfiles with
## buildah, on a Debian base made here with debootstrap; cached by content (a rerun with nothing changed
## takes about a second). A real node imports them into its containerd.
IMAGES ?= operator trainer
images: setup node-deps
	$(PY) -m finetune_devcluster images $(IMAGES)

## realnode-tools: the kubelet and kube-proxy (gotools/kubelet, the control plane's versions), the sandbox binary and CoreDNS (gotools/coredns) of a real node
realnode-tools: setup
	$(PY) -m finetune_devcluster build kubelet kube-proxy pause coredns

## crds: regenerate crds/ from the spec model (operator/finetune_api/spec.py)
crds: setup
	$(PY) -m finetune_api.crd > crds/finetune.io_finetunejobs.yaml
	$(PY) -m finetune_api.crd --sweep > crds/finetune.io_finetunesweeps.yaml

## demo: start the local control plane, a real node (kubelet + containerd, root), MinIO, Prometheus, MLflow;
## `helm install` the operator (its Deployment, from the image built here) and run the example jobs as
## containers from the trainer image built here. NODE=process: pods as local processes (no root or containerd)
NODE ?= real
demo: tools
	@if [ "$(NODE)" = real ]; then $(MAKE) --no-print-directory node-deps images realnode-tools; fi
	$(PY) -m finetune_devcluster demo --node $(NODE)

## down: stop everything `make demo` started
down:
	$(PY) -m finetune_devcluster down

## test: every test (unit, chart, control plane, trainer); what CI runs. The tests marked realnode
## are deselected (tests/conftest.py; pytest's summary counts them): `make test-realnode` runs them.
test: tools
	$(PY) -m pytest $(PYTEST_ARGS)

## test-realnode: the tests marked realnode (a kubelet + containerd node; root), after building what they
## need (Debian packages, the operator image, the kubelet); opt-in, not part of `make test`
test-realnode: tools node-deps images realnode-tools
	FINETUNE_REALNODE=1 $(PY) -m pytest -m realnode $(PYTEST_ARGS)

## test-unit: the pure tests only (no binaries needed)
test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
