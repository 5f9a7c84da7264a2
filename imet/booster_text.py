"""Structural checks of LightGBM model text, in Python, before LightGBM parses it.

LightGBM's text parser trusts its input. Measured with LightGBM 4.7: a tree whose arrays are shorter or
longer than its `num_leaves` says, a `tree_sizes` entry that misses its tree, a number it cannot parse or
a categorical split without its tables abort the process from inside a parallel region (SIGABRT, exit 134,
no message); a child index that points back up the tree makes `predict` loop for ever; a NUL byte ends
the text LightGBM reads (its offsets then point past it); a split on a feature past the row reads outside
it. So every text imet hands to LightGBM (the `lgbm` head's boosters, a stack file's booster) passes
`check_booster_text` first, which accepts only what LightGBM writes for a binary model of numeric splits:

- printable ASCII and newlines only; a header of known `key=value` lines: objective `binary sigmoid:1`,
  one class, one tree per iteration, label 0, `max_feature_idx` + 1 equal to the feature count the
  caller expects, as many feature names and feature infos;
- trees numbered 0, 1, ..., one per `tree_sizes` entry, each entry the tree's exact byte length; every
  field once, in LightGBM's order; arrays of `num_leaves` - 1 (nodes) or `num_leaves` (leaves) numbers
  written as LightGBM writes them (integers of at most 10 digits, decimals with at most 20 integer digits
  and exponents below 100, so every value is finite); `split_feature` within the features; numeric
  decision types only (no categorical split, no linear leaves); child indices within the tree, each node
  and leaf the child of exactly one node and the root of none (so a walk from the root reaches a leaf
  within `num_leaves` - 1 steps);
- then `end of trees`, feature importances (name=count), parameters ([name: value]) and
  `pandas_categorical:null` (which LightGBM's Python side parses as JSON), nothing else.

A tree is matched by one regular expression and the indices of all trees are checked at once with numpy;
a refused text is read again line by line to name the tree and the field at fault. Its cost beside
LightGBM's own load is printed by `benchmarks/bench_booster_check.py`.
"""

from __future__ import annotations

import re

import numpy as np

from imet.errors import ImetError

HEADER_KEYS = ("version", "num_class", "num_tree_per_iteration", "label_index", "max_feature_idx", "objective",
               "average_output", "feature_names", "feature_infos", "tree_sizes")
NODE_INTS = ("split_feature", "decision_type", "left_child", "right_child", "internal_count")
NODE_FLOATS = ("split_gain", "threshold", "internal_value", "internal_weight")
TREE_KEYS = ("num_leaves", "num_cat", "split_feature", "split_gain", "threshold", "decision_type", "left_child",
             "right_child", "leaf_value", "leaf_weight", "leaf_count", "internal_value", "internal_weight",
             "internal_count", "is_linear", "shrinkage")  # LightGBM's order
LEAF_KEYS = ("leaf_value", "leaf_weight", "leaf_count")
NUMERIC_DECISIONS = (0, 2, 4, 6, 8, 10)  # default-left (2) and missing type (none, zero, NaN: 0, 4, 8) bits
MAX_LEAVES = 1 << 17  # LightGBM's own limit on num_leaves

_I = rb"-?[0-9]{1,10}"  # as LightGBM writes them (Python's int() and float() would also take '1_0', ' 5', 'nan')
_F = rb"-?(?:[0-9]{1,20}(?:\.[0-9]*)?|\.[0-9]+)(?:[eE](?:\+?[0-9]{1,2}|-[0-9]{1,3}))?"  # finite by its form
_INTS, _FLOATS = (re.compile(x + rb"(?: " + x + rb")*") for x in (_I, _F))
FLOAT_KEYS = ("shrinkage", "leaf_value", "leaf_weight", *NODE_FLOATS)
_KINDS = {"num_leaves": rb"[0-9]{1,6}", "num_cat": rb"0", "is_linear": rb"0", "shrinkage": _F}
_LINES = 19  # newlines of a tree: its Tree= line, 16 fields, two blank lines
_NEWLINE, _SPACE, _MINUS, _PLUS, _DOT, _E, _EQUALS = b"\n -+.e="
_PRINTABLE = bytes(range(32, 127)) + b"\n"
_TAIL = re.compile(rb"end of trees\n\nfeature_importances:\n(?:[!-<>-~]+=[0-9]+\n)*\nparameters:\n"
                   rb"(?:\[[a-z0-9_]+: [ -Z^-~]*\]\n)*\nend of parameters\n\npandas_categorical:null\n")


def check_booster_text(text: str, n_features: int, where: str) -> None:
    """Refuse LightGBM model text that LightGBM could not parse and walk safely (ImetError naming `where`,
    the tree and the field); `n_features` is the row width the booster will predict on."""
    data = text.encode("utf-8", "replace") if isinstance(text, str) else b"\0"
    if data.translate(None, _PRINTABLE):
        raise ImetError(f"{where}: LightGBM model text holds bytes other than printable ASCII and newlines")
    start, end = data.find(b"\nTree=") + 1, data.find(b"\nend of trees") + 1
    if not data.startswith(b"tree\n") or not 0 < start < end:
        raise ImetError(f"{where}: not LightGBM model text (no 'tree' header, no tree or no 'end of trees')")
    sizes = _header(data[:start], n_features, where)
    if sum(sizes) != end - start:
        raise ImetError(f"{where}: tree_sizes adds up to {sum(sizes)} bytes, the trees take {end - start}")
    _check_trees(data, start, np.array(sizes, np.int64), n_features, where)
    if not _TAIL.fullmatch(data, end):
        raise ImetError(f"{where}: what follows 'end of trees' is not the feature importances, parameters and "
                        "pandas_categorical:null that LightGBM writes")


def _header(block: bytes, n_features: int, where: str) -> list[int]:
    """The header's tree sizes, once its fields are checked."""
    kv = _pairs(block.split(b"\n")[1:], where)
    unknown = sorted(set(kv) - set(HEADER_KEYS))
    if unknown:
        raise ImetError(f"{where}: header field {unknown[0]} is not one imet's boosters have")
    for key, want in (("num_class", 1), ("num_tree_per_iteration", 1), ("label_index", 0),
                      ("max_feature_idx", n_features - 1)):
        if kv.get(key) != str(want).encode():
            raise ImetError(f"{where}: {key} is {kv.get(key)!r}, expected {want}"
                            + (f" ({n_features} features)" if key == "max_feature_idx" else ""))
    if kv.get("objective") != b"binary sigmoid:1":
        raise ImetError(f"{where}: objective is {kv.get('objective')!r}, not imet's 'binary sigmoid:1'")
    for key in ("feature_names", "feature_infos"):  # LightGBM checks their count only (cleanly)
        value = kv.get(key, b"")
        if b"  " in value or value[:1] == b" " or value[-1:] == b" " or value.count(b" ") + 1 != n_features:
            raise ImetError(f"{where}: {key} must list {n_features} features, one space apart")
    sizes = kv.get("tree_sizes", b"")
    if not re.fullmatch(rb"[1-9][0-9]{0,11}(?: [1-9][0-9]{0,11})*", sizes):
        raise ImetError(f"{where}: tree_sizes must list the positive byte size of each tree")
    return [int(x) for x in sizes.split(b" ")]


def _pairs(lines: list[bytes], where: str) -> dict[str, bytes]:
    """key -> value of `key=value` lines (blank lines skipped); refuses a line without exactly one '=' and
    a key given twice."""
    out: dict[str, bytes] = {}
    for line in filter(None, lines):
        key, _, value = line.partition(b"=")
        name = key.decode()
        if line.count(b"=") != 1 or name in out:
            raise ImetError(f"{where}: line {line[:40].decode()!r} is not a single key=value")
        out[name] = value
    return out


def _check_trees(data: bytes, start: int, sizes: np.ndarray, n_features: int, where: str) -> None:
    """Every tree's lines, number forms, array lengths, feature indices, decision types and shape, checked
    with numpy over the whole text at once; the first tree at fault is diagnosed line by line."""
    c = np.frombuffer(data, np.uint8, count=int(sizes.sum()), offset=start)  # the trees' bytes
    bounds = np.concatenate([[0], np.cumsum(sizes)])  # (T + 1,) where each tree starts
    lines = _tree_lines(c, bounds)  # (T, 19) each tree's newlines, or the first tree whose lines are wrong
    if isinstance(lines, int):
        _diagnose(data, start + int(bounds[lines]), lines, int(sizes[lines]), n_features, where)
    begin = np.concatenate([bounds[:-1, None], lines[:, :-1] + 1], axis=1)  # (T, 19) where each line starts
    bad = ~(c[begin[:, :1] + np.arange(5)] == np.frombuffer(b"Tree=", np.uint8)).all(1)
    spans = {}
    for j, key in enumerate(TREE_KEYS, 1):
        prefix = np.frombuffer(key.encode() + b"=", np.uint8)
        bad |= ~(c[begin[:, j:j + 1] + np.arange(len(prefix))] == prefix).all(1)
        spans[key] = (begin[:, j] + len(prefix), lines[:, j])  # (T,) value start and end of each tree
    bad |= ~_forms_ok(c, spans, begin[:, 0])
    leaves = np.array([_count(data[start + a:start + b]) for a, b in zip(*spans["num_leaves"], strict=True)])
    bad |= (leaves < 1) | (leaves > MAX_LEAVES)
    spaces = np.concatenate([[0], np.cumsum(c == _SPACE, dtype=np.int32)])
    for key in TREE_KEYS[2:]:
        a, b = spans[key]
        counts = np.where(b > a, spaces[b] - spaces[a] + 1, 0)
        want = (np.where(leaves > 1, leaves, key != "leaf_weight") if key in LEAF_KEYS else
                np.ones_like(leaves) if key in ("is_linear", "shrinkage") else leaves - 1)
        bad |= counts != want
    if not bad.any():
        nodes = {k: _ints(data, start, *spans[k]) for k in ("split_feature", "decision_type", "left_child",
                                                             "right_child")}
        bad = _shape_bad(nodes, leaves, n_features)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        _diagnose(data, start + int(bounds[i]), i, int(sizes[i]), n_features, where)


def _tree_lines(c: np.ndarray, bounds: np.ndarray) -> np.ndarray | int:
    """(T, 19) positions of each tree's newlines (its Tree= line, 16 fields, two blank lines), or the
    index of the first tree that is not laid out so."""
    newlines = np.flatnonzero(c == _NEWLINE)
    first = np.searchsorted(newlines, bounds)
    bad = np.diff(first) != _LINES
    if not bad.any():
        lines = newlines[first[:-1, None] + np.arange(_LINES)]
        bad = (lines[:, -1] != bounds[1:] - 1) | (lines[:, -2] != bounds[1:] - 2) | (lines[:, -3] != bounds[1:] - 3)
        bad |= (np.diff(lines[:, :-2], axis=1) < 2).any(1)  # an empty field line
        if not bad.any():
            return lines
    return int(np.flatnonzero(bad)[0])


def _count(value: bytes) -> int:
    """num_leaves as written (0 when it is not 1 to 6 digits)."""
    return int(value) if value.isdigit() and len(value) <= 6 else 0


def _forms_ok(c: np.ndarray, spans: dict[str, tuple[np.ndarray, np.ndarray]], starts: np.ndarray) -> np.ndarray:
    """(T,) whether every value of a tree is written as LightGBM writes numbers: integers -?D{1,10} and
    decimals -?D+(.D+)?(e[-+]D+)? of at most 30 digits a run and positive exponents of at most 2 digits
    (so finite), one space apart; num_cat and is_linear 0."""
    n = len(c)
    kind = np.zeros(n + 1, np.int8)  # 1 on integer values, 2 on decimal values, 0 on keys and structure
    for key, (a, b) in spans.items():
        code = 2 if key in FLOAT_KEYS else 1
        kind[a] += code
        kind[b] -= code
    kind = np.cumsum(kind[:-1], dtype=np.int8)
    padded = np.concatenate([[_NEWLINE], c, [_NEWLINE]])
    prev, nxt = padded[:-2], padded[2:]
    digit = (c >= ord("0")) & (c <= ord("9"))
    pad_digit = np.concatenate([[False], digit, [False]])
    prev_digit, nxt_digit = pad_digit[:-2], pad_digit[2:]
    dec = kind == 2
    ok = (kind == 0) | digit
    ok |= (c == _SPACE) & prev_digit & (nxt_digit | (nxt == _MINUS))
    ok |= (c == _MINUS) & nxt_digit & ((prev == _SPACE) | (prev == _EQUALS) | (dec & (prev == _E)))
    ok |= dec & (((c == _PLUS) & (prev == _E) & nxt_digit) | ((c == _DOT) & prev_digit & nxt_digit)
                 | ((c == _E) & prev_digit & ((nxt == _MINUS) | (nxt == _PLUS))))
    first, last = np.flatnonzero(digit & ~prev_digit), np.flatnonzero(digit & ~nxt_digit)  # digit runs
    length = last - first + 1
    ok[first[length > np.where(dec[first], 30, 10)]] = False
    plus = np.flatnonzero(dec & (c == _PLUS))
    ok[plus[length[np.minimum(np.searchsorted(first, plus + 1), len(first) - 1)] > 2]] = False  # e+DDD: too big
    for key in ("num_cat", "is_linear"):  # exactly "0"
        a, b = spans[key]
        ok[a] &= (b - a == 1) & (c[a] == ord("0"))
    bad = np.zeros(len(starts), bool)
    bad[np.searchsorted(starts, np.flatnonzero(~ok), side="right") - 1] = True
    return ~bad


def _shape_bad(nodes: dict[str, np.ndarray], leaves: np.ndarray, n_features: int) -> np.ndarray:
    """(T,) trees whose split features, decision types or children are wrong (lengths already checked)."""
    tree_of = np.repeat(np.arange(len(leaves)), leaves - 1)  # (nodes,) the tree of each internal node
    n = leaves[tree_of]  # (nodes,) leaves of its tree
    children = np.stack([nodes["left_child"], nodes["right_child"]])  # (2, nodes)
    ok = (nodes["split_feature"] >= 0) & (nodes["split_feature"] < n_features)
    ok &= np.isin(nodes["decision_type"], NUMERIC_DECISIONS)
    ok &= np.where(children >= 0, (children >= 1) & (children <= n - 2), children >= -n).all(0)
    bad = np.zeros(len(leaves), bool)
    bad[tree_of[~ok]] = True
    if bad.any():
        return bad
    first = np.concatenate([[0], np.cumsum(leaves - 1)])  # global id of each tree's root; [-1]: all nodes
    leaf_first = np.concatenate([[0], np.cumsum(leaves)])
    node_uses = np.bincount((first[tree_of] + children)[children >= 0], minlength=int(first[-1]))
    leaf_uses = np.bincount((leaf_first[tree_of] + ~children)[children < 0], minlength=int(leaf_first[-1]))
    want = np.ones(int(first[-1]), np.int64)
    want[first[:-1][leaves > 1]] = 0  # roots are nobody's child; each other node and each leaf is one child
    leaf_tree = np.repeat(np.arange(len(leaves)), leaves)
    bad[tree_of[node_uses != want]] = True
    bad[leaf_tree[leaf_uses != (leaves[leaf_tree] > 1)]] = True
    return bad


def _ints(data: bytes, start: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The integers of the value spans [a, b) (relative to `start`), end to end (C parsing: their form was
    checked)."""
    text = b" ".join(data[start + x:start + y] for x, y in zip(a.tolist(), b.tolist(), strict=True) if y > x)
    return np.fromstring(text, dtype=np.int64, sep=" ") if text else np.zeros(0, np.int64)


def _diagnose(data: bytes, pos: int, i: int, size: int, n_features: int, where: str) -> None:
    """Read refused tree i (at `pos`, `size` bytes) line by line; raise an ImetError naming its field at fault."""
    where = f"{where}: tree {i}"
    block, after = data[pos:pos + size], data[pos + size:pos + size + 12]
    if not block.startswith(b"Tree=%d\n" % i) or not block.endswith(b"\n\n") or not (
            after.startswith(b"Tree=") or after == b"end of trees"):
        raise ImetError(f"{where}: tree_sizes entry {i} ({size} bytes) does not end where the next tree starts")
    lines = block.split(b"\n")
    body = [x for x in lines[1:] if x]
    if lines[1:len(body) + 1] != body:
        raise ImetError(f"{where}: a blank line inside the tree")
    kv = _pairs(body, where)
    missing = [k for k in TREE_KEYS if k not in kv]
    extra = sorted(set(kv) - set(TREE_KEYS))
    if missing or extra:
        raise ImetError(f"{where}: field {(missing or extra)[0]} is " + ("missing" if missing else "not allowed"))
    if list(kv) != list(TREE_KEYS):
        raise ImetError(f"{where}: its fields are not in LightGBM's order")
    for key in ("num_leaves", "num_cat", "is_linear", "shrinkage"):
        if not re.fullmatch(_KINDS[key], kv[key]):
            raise ImetError(f"{where}: {key} is {kv[key][:20].decode()!r}"
                            + (", not 0 (imet's boosters make numeric splits only)" if _KINDS[key] == rb"0"
                               else ", not a number as LightGBM writes it"))
    n = int(kv["num_leaves"])
    if not 1 <= n <= MAX_LEAVES:
        raise ImetError(f"{where}: num_leaves {n} is outside 1..{MAX_LEAVES}")
    values = {k: _values(kv[k], n, k, where) for k in TREE_KEYS[2:] if k not in ("is_linear", "shrinkage")}
    if n > 1:
        bad = next((f for f in values["split_feature"] if not 0 <= f < n_features), None)
        if bad is not None:
            raise ImetError(f"{where}: split_feature {bad} is outside the {n_features} features")
        odd = next((d for d in values["decision_type"] if d not in NUMERIC_DECISIONS), None)
        if odd is not None:
            raise ImetError(f"{where}: decision_type {odd} is not a numeric split")
        _check_children(values["left_child"] + values["right_child"], n, where)
    raise ImetError(f"{where}: not a tree as LightGBM writes it")


def _values(value: bytes, n: int, key: str, where: str) -> list[int] | None:
    """One array field of a tree of n leaves, checked; its integers (None for a decimal field)."""
    count = n if key in LEAF_KEYS and (n > 1 or key != "leaf_weight") else n - 1 if key not in LEAF_KEYS else 0
    if not count:  # LightGBM reads no node arrays, nor leaf_weight, of a tree of one leaf
        if value:
            raise ImetError(f"{where}: {key} must be empty in a tree of one leaf")
        return []
    ints = key in ("leaf_count", *NODE_INTS)
    if not (_INTS if ints else _FLOATS).fullmatch(value):
        raise ImetError(f"{where}: {key} is {value[:40].decode()!r}..., not numbers as LightGBM writes them "
                        "(finite, one space apart)")
    if value.count(b" ") + 1 != count:
        raise ImetError(f"{where}: {key} has {value.count(b' ') + 1} values, num_leaves makes it {count}")
    return [int(x) for x in value.split(b" ")] if ints else None


def _check_children(children: list[int], n: int, where: str) -> None:
    """Each internal node but the root (1..n-2) and each leaf (-1..-n) is a child exactly once."""
    seen_nodes, seen_leaves = [0] * (n - 1), [0] * n
    for c in children:
        if 0 < c < n - 1:
            seen_nodes[c] += 1
        elif -n <= c < 0:
            seen_leaves[~c] += 1
        else:
            raise ImetError(f"{where}: child index {c} is outside the tree (nodes 1..{n - 2}, leaves -1..-{n})")
    if any(k != 1 for k in seen_nodes[1:]) or any(k != 1 for k in seen_leaves):
        raise ImetError(f"{where}: left_child and right_child do not make a tree (a node or leaf is the child "
                        "of no node or of two)")
