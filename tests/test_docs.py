"""The documentation (README.md, docs/*.md) against the code: the config keys table of
docs/model.md against ``add_deeperlab_config``, relative links, ``--config-file`` paths, and the
README commands that ``.ci/run`` and ``scripts/main.sh`` users rely on."""

import ast
import importlib.util
import math
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
CONFIG_PY = REPO / "deeperlab_d2" / "config.py"
KEYS_DOC = REPO / "docs" / "model.md"

# the two commands of the README's "The two commands" section; .ci/run runs the second
TWO_COMMANDS = ("bash scripts/main.sh", "bash scripts/test.sh")


def _table_rows(text: str, header: str):
    """The cells of each row of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        # split on | outside backticks
        cells, cell, in_code = [], "", False
        for ch in line.strip()[1:-1]:
            if ch == "`":
                in_code = not in_code
            if ch == "|" and not in_code:
                cells.append(cell.strip())
                cell = ""
            else:
                cell += ch
        cells.append(cell.strip())
        rows.append(cells)
    return rows


def _expand(key: str):
    m = re.search(r"\{([^}]*)\}", key)
    if not m:
        return [key]
    return [
        k
        for name in m.group(1).split(",")
        for k in _expand(key[: m.start()] + name.strip() + key[m.end() :])
    ]


def documented_keys():
    """{key: default as parsed from the table} of the config keys table."""
    rows = _table_rows(KEYS_DOC.read_text(), "| key | default |")
    assert rows, "no config keys table in docs/model.md"
    documented = {}
    for cells in rows:
        keys = [k for name in re.findall(r"`([^`]+)`", cells[0]) for k in _expand(name)]
        assert keys, f"row without a key: {cells}"
        values = [v.strip() for v in cells[1].split(" / ")]
        if len(values) == 1:
            values = values * len(keys)
        assert len(values) == len(keys), f"{len(keys)} keys but {len(values)} defaults: {cells}"
        for key, value in zip(keys, values):
            assert key not in documented, f"{key} is documented twice"
            documented[key] = yaml.safe_load(value)
    return documented


def keys_set_by_function():
    """Every ``_C.A.B = value`` leaf assignment in ``add_deeperlab_config`` (not ``CN()``)."""
    tree = ast.parse(CONFIG_PY.read_text())
    func = next(
        n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "add_deeperlab_config"
    )
    keys = set()
    for node in ast.walk(func):
        if not isinstance(node, ast.Assign):
            continue
        value = node.value
        if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "CN":
            continue
        for target in node.targets:
            parts = []
            while isinstance(target, ast.Attribute):
                parts.append(target.attr)
                target = target.value
            if isinstance(target, ast.Name) and target.id == "_C" and parts:
                keys.add(".".join(reversed(parts)))
    return keys


def _same(documented, actual) -> bool:
    if isinstance(actual, (list, tuple)):
        return (
            isinstance(documented, (list, tuple))
            and len(documented) == len(actual)
            and all(_same(d, a) for d, a in zip(documented, actual))
        )
    if isinstance(actual, bool) or isinstance(documented, bool):
        return documented is actual
    if isinstance(actual, (int, float)):
        return isinstance(documented, (int, float)) and math.isclose(documented, actual)
    return str(documented) == str(actual)


def test_config_keys_table_matches_add_deeperlab_config():
    from detectron2.config import get_cfg

    # config.py itself, not the deeperlab_d2 package (whose import builds every module)
    spec = importlib.util.spec_from_file_location("_deeperlab_config", CONFIG_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    add_deeperlab_config = module.add_deeperlab_config
    cfg = get_cfg()
    add_deeperlab_config(cfg)
    set_keys = keys_set_by_function()
    assert len(set_keys) > 50 and "MODEL.DEEPERLAB.NUM_CLASSES" in set_keys
    documented = documented_keys()

    missing = sorted(set_keys - set(documented))
    assert not missing, f"keys added by add_deeperlab_config missing from docs/model.md: {missing}"
    for key, value in documented.items():
        node = cfg
        for part in key.split("."):
            assert part in node, f"docs/model.md documents {key}, which the config lacks"
            node = node[part]
        assert _same(value, node), f"docs/model.md: {key} default {value!r}, config {node!r}"
        # a documented key is the plugin's: new, or a Detectron2 key whose default it changes
        assert key in set_keys, f"docs/model.md documents {key}, not set by add_deeperlab_config"
    assert "INPUT.CROP.SIZE" in set_keys  # Detectron2 keys whose defaults it changes count


def test_table_parser_catches_drift():
    """A wrong default or a missing key makes the comparison fail (the test is not vacuous)."""
    assert not _same(0.25, 0.1) and not _same("True", True) and not _same([6, 12], [6, 12, 18])
    assert _same([513, 513], (513, 513)) and _same(1.0, 1) and _same(True, True)
    assert _expand("A.{B,C}.D") == ["A.B.D", "A.C.D"]


def _doc_files():
    return [README] + DOCS


def _strip_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.name)
def test_relative_links_exist(path):
    assert DOCS, "docs/ has no markdown files"
    text = _strip_code(path.read_text())
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = []
    for link in links:
        if re.match(r"[a-z]+://|mailto:", link):
            continue
        target = link.split("#", 1)[0]
        if not target:  # an anchor in the same file
            continue
        if not (path.parent / target).exists():
            broken.append(link)
    assert not broken, f"{path.name}: links to missing files: {broken}"


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.name)
def test_config_files_exist(path):
    paths = re.findall(r"--config-file\s+([^\s`\\]+)", path.read_text())
    missing = [p for p in paths if not p.startswith(("<", "$")) and not (REPO / p).is_file()]
    assert not missing, f"{path.name}: --config-file names missing files: {missing}"


def test_readme_keeps_the_two_commands():
    text = README.read_text()
    section = text.split("## The two commands", 1)
    assert len(section) == 2, "README.md lost its 'The two commands' section"
    body = section[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, flags=re.S)
    assert block, "no bash block in 'The two commands'"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == list(TWO_COMMANDS)
    # .ci/run runs the README's test command
    ci = (REPO / ".ci" / "run").read_text()
    assert TWO_COMMANDS[1] in ci
    for command in TWO_COMMANDS:
        assert (REPO / command.split()[1]).is_file()
