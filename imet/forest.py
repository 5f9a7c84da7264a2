"""LightGBM's raw scores of many binary boosters at once, in numpy: the same bits, several times faster.

`booster.predict` turns each row into LightGBM's internal form once per booster: at 1,103 labels (~970
boosters of ~45-59 trees of 15 leaves, 2,048 features) that costs 12-26 us per row per booster, 12-25 ms
per view, while the trees are about 4 levels deep. `Forest` parses the boosters' model texts once (texts
imet has checked with `imet.booster_text`: numeric splits only) and scores a chunk of rows for a group of
trees together, QuickScorer style (Lucchese et al., 2015):

- each node's test is LightGBM's (`Tree::NumericalDecision`): left when value <= threshold; LightGBM's
  dense row reader drops values within 1e-35 of 0, and a NaN counts as 0 at a split of missing type None.
  imet's fits have no NaN and only missing type None (checked on the 32k store's model); a model with
  missing type Zero or NaN (or a tree of more than 64 leaves) is refused with ValueError and the caller
  predicts with LightGBM;
- rows are float32 and thresholds double: v <= t exactly when v <= the largest float32 not above t, and
  the thresholds of a feature are few (the fit bins every feature into 63 bins), so each row value is
  turned once into its bin among its feature's thresholds (uint8) and every test is bin <= cut index;
- a node whose test fails rules out the leaves of its left subtree: with a tree's leaves numbered left to
  right, its exit leaf is the lowest bit left set in the AND of the failed nodes' masks (no per-row walk);
- leaf values are added in float64 one tree after another in each booster's order, as LightGBM adds
  them: the same raw score to the bit, not merely a close one (tests/test_lgbm.py).

`benchmarks/bench_lgbm_predict.py` times it beside LightGBM on a fitted model.
"""

from __future__ import annotations

import numpy as np

ZERO = 1e-35  # LightGBM's kZeroThreshold
MAX_LEAVES = 64  # leaves per tree a uint64 mask holds
GROUP_CELLS = 1 << 20  # trees x rows scored at once (~1M: a few MB of temporaries per step)


def parse_trees(text: str) -> list[dict]:
    """Each tree of a LightGBM model text as num_leaves and its node and leaf arrays."""
    body = text[text.index("\nTree=") + 1:text.index("\nend of trees")]
    trees = []
    for block in body.split("Tree=")[1:]:
        kv = dict(line.split("=", 1) for line in block.split("\n")[1:] if "=" in line)
        tree = {"num_leaves": int(kv["num_leaves"]), "leaf_value": np.array(kv["leaf_value"].split(), np.float64)}
        for key, kind in (("split_feature", np.int64), ("decision_type", np.int64), ("left_child", np.int64),
                          ("right_child", np.int64), ("threshold", np.float64)):
            tree[key] = np.array(kv[key].split(), kind)
        trees.append(tree)
    return trees


def left_masks(tree: dict) -> tuple[np.ndarray, np.ndarray]:
    """(node masks, leaf of each left-to-right position): a node's mask clears the positions of the leaves
    of its left subtree, the ones a failed test (go right) rules out."""
    n = tree["num_leaves"]
    order: list[int] = []  # leaves in left-to-right order
    masks = np.zeros(n - 1, np.uint64)
    full = (1 << n) - 1

    def walk(node: int) -> tuple[int, int]:  # (first, end) positions of the node's leaves
        if node < 0:
            order.append(~node)
            return len(order) - 1, len(order)
        a, b = walk(int(tree["left_child"][node]))
        _, e = walk(int(tree["right_child"][node]))
        masks[node] = full & ~(((1 << (b - a)) - 1) << a)
        return a, e

    walk(0 if n > 1 else -1)
    return masks, np.array(order, np.int64)


def below_float32(t: np.ndarray) -> np.ndarray:
    """The largest float32 <= each double in `t`: float32 v <= t exactly when v <= this."""
    f = t.astype(np.float32)
    return np.where(f.astype(np.float64) > t, np.nextafter(f, np.float32(-np.inf)), f)


class Forest:
    """Every tree of a list of binary boosters (their model texts over `n_features`), scored as LightGBM
    scores them. Nodes are kept as (trees, K) arrays, K the most internal nodes of a tree; a smaller tree
    is padded with nodes whose mask rules out nothing, so a group of trees is scored in K numpy steps."""

    def __init__(self, texts: list[str], n_features: int):
        trees, boosters, ranks = [], [], []
        for b, text in enumerate(texts):
            for rank, tree in enumerate(parse_trees(text)):
                if tree["num_leaves"] > MAX_LEAVES:
                    raise ValueError(f"a tree of {tree['num_leaves']} leaves (at most {MAX_LEAVES})")
                trees.append(tree)
                boosters.append(b)
                ranks.append(rank)
        sizes = np.array([t["num_leaves"] for t in trees], np.int64)
        most = int(sizes.max(initial=1))
        self.bits = next(k for k in (np.uint16, np.uint32, np.uint64) if np.iinfo(k).bits >= most)
        k = most - 1
        n = len(trees)
        self.feature = np.zeros((n, k), np.int64)
        threshold = np.full((n, k), np.inf)
        kind = np.zeros((n, k), np.int64)
        self.mask = np.full((n, k), np.iinfo(self.bits).max, self.bits)
        self.leaf_base = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # (T,) first leaf
        leaf_values = []
        for i, tree in enumerate(trees):
            m, order = left_masks(tree)
            j = len(m)
            self.feature[i, :j], threshold[i, :j], kind[i, :j] = (tree["split_feature"], tree["threshold"],
                                                                   tree["decision_type"])
            self.mask[i, :j] = m
            leaf_values.append(tree["leaf_value"][order])  # by left-to-right position
        if (kind & 1).any():
            raise ValueError("a categorical split")
        if ((kind >> 2) & 3).any():
            raise ValueError("a split with missing type Zero or NaN (imet's boosters have none)")
        self.n_boosters = len(texts)
        threshold = below_float32(threshold)  # (T, K) float32, padding +inf
        real = np.arange(k) < (sizes - 1)[:, None]  # (T, K) not padding
        # each feature's distinct thresholds (its cuts), from one sort of (feature, threshold) keys
        values = np.unique(threshold[real])
        span = len(values) + 1
        key = self.feature[real] * span + np.searchsorted(values, threshold[real])
        keys = np.unique(key)
        first = np.searchsorted(keys, np.arange(n_features + 1) * span)  # (F + 1,) each feature's first key
        self.cuts = [values[keys[a:b] % span] for a, b in zip(first[:-1], first[1:], strict=True)]
        widest = int(np.diff(first).max(initial=0))
        self.bin_type = np.uint8 if widest < 255 else np.uint16
        # a node's test v <= threshold, with bin(v) = how many of its feature's cuts lie below v, is
        # bin(v) <= the threshold's index among the cuts; padding nodes never fail
        self.cut = np.full((n, k), np.iinfo(self.bin_type).max, self.bin_type)
        self.cut[real] = np.searchsorted(keys, key) - first[self.feature[real]]
        self.tree_booster = np.array(boosters, np.int64)  # (T,)
        self.tree_rank = np.array(ranks, np.int64)  # (T,) each tree's place in its booster
        self.leaf_value = np.concatenate(leaf_values) if leaf_values else np.zeros(0)  # (L,)

    def raw(self, x: np.ndarray) -> np.ndarray:
        """(rows, boosters) float64 raw scores of float32 rows `x` (rows, features), as LightGBM's
        `predict(x, raw_score=True)` gives them."""
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != len(self.cuts):
            raise ValueError(f"Forest.raw takes a 2-d float32 array of {len(self.cuts)} features")
        # LightGBM's dense rows skip values within 1e-35 of 0, and a NaN is 0 for missing type None
        x = np.where((np.abs(x) <= ZERO) | np.isnan(x), np.float32(0), x)
        bins = np.empty((x.shape[1], len(x)), self.bin_type)  # (F, R): a node's bins are one contiguous row
        for f, cuts in enumerate(self.cuts):
            bins[f] = np.searchsorted(cuts, x[:, f], "left")
        out = np.zeros((self.n_boosters, len(x)), np.float64)
        trees = len(self.tree_booster)
        step = max(1, GROUP_CELLS // max(1, len(x)))
        for lo in range(0, trees, step):
            hi = min(trees, lo + step)
            leaf = self._leaves(bins, slice(lo, hi))  # (t, R)
            values = self.leaf_value[self.leaf_base[lo:hi, None] + leaf]  # (t, R)
            boosters, rank = self.tree_booster[lo:hi], self.tree_rank[lo:hi]
            for r in range(rank.min(), rank.max() + 1):  # tree after tree, as LightGBM adds them
                same = np.flatnonzero(rank == r)  # at most one tree of each booster
                out[boosters[same]] += values[same]
        return out.T

    def _leaves(self, bins: np.ndarray, trees: slice) -> np.ndarray:
        """(trees, rows) left-to-right position of each row's exit leaf in `trees`."""
        ones = self.bits(np.iinfo(self.bits).max)
        shape = (trees.stop - trees.start, bins.shape[1])
        alive, v, gone = np.full(shape, ones), np.empty(shape, self.bin_type), np.empty(shape, self.bits)
        for k in range(self.feature.shape[1]):
            np.take(bins, self.feature[trees, k], axis=0, out=v)
            np.greater(v, self.cut[trees, k, None], out=gone, casting="unsafe")  # 1: the test fails
            np.multiply(gone, ~self.mask[trees, k, None], out=gone)  # the leaves a failed test rules out
            np.bitwise_xor(gone, ones, out=gone)
            np.bitwise_and(alive, gone, out=alive)
        low = alive & (~alive + self.bits(1))  # the lowest set bit
        return np.frexp(low.astype(np.float32))[1].astype(np.int64) - 1  # its position: exact
