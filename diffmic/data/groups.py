"""Group-aware splits: images of one group (one lesion photographed several times, one eye uploaded twice) never sit
on both sides of a split, or validation and test figures are inflated by images the model has as good as seen.

Groups come from the data (`dataset.group_column`: HAM10000's `lesion_id`, a CSV column, a key of a pkl list) and,
with `dataset.group_duplicates`, from the pixels: exact and near duplicates, found in two steps. A perceptual hash
(pHash: the signs of the 8x8 lowest frequencies of the 32x32 grey thumbnail's DCT, against their median; 64 bits)
proposes pairs within `dataset.duplicate_distance` differing bits (4 by default); a pair is merged only when the two
32x32 grey thumbnails also correlate at >= MIN_CORRELATION. The hash alone would merge look-alikes: fundus photographs
share the dark frame and the bright disc that dominate their lowest frequencies. Re-encodings, small resizes and
crops of one image pass both steps. Checked here on generated images only (no real APTOS set on these machines).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from diffmic.data.splits import stratified_carve

HASH_SIDE, THUMB = 8, 32  # 8x8 = 64 bits from the DCT of a 32x32 thumbnail
MIN_CORRELATION = 0.97
_DCT = np.sqrt(2 / THUMB) * np.cos(np.pi * (2 * np.arange(THUMB)[None, :] + 1) * np.arange(THUMB)[:, None]
                                   / (2 * THUMB))


def fingerprint(image) -> tuple[int, np.ndarray]:
    """(64-bit pHash, the standardised 32x32 grey thumbnail) of a PIL image."""
    from PIL import Image
    grey = np.asarray(image.convert("L").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.float64)
    low = (_DCT @ grey @ _DCT.T)[:HASH_SIDE, :HASH_SIDE].flatten()
    bits = low > np.median(low[1:])  # the DC term excluded from the median (it is the brightness)
    thumb = grey.flatten() - grey.mean()
    thumb /= max(np.linalg.norm(thumb), 1e-9)
    return int(np.packbits(bits).view(">u8")[0]), thumb


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def union_groups(n: int, pairs) -> np.ndarray:
    """Connected components of `pairs` (i, j) over 0..n-1, as a component id per item."""
    parent = list(range(n))
    for i, j in pairs:
        a, b = _find(parent, int(i)), _find(parent, int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([_find(parent, i) for i in range(n)], dtype=np.int64)


def near_duplicates(prints: Sequence[tuple[int, np.ndarray]], distance: int,
                    min_correlation: float = MIN_CORRELATION) -> list[tuple[int, int]]:
    """Pairs whose hashes differ in at most `distance` bits and whose thumbnails correlate at >= min_correlation
    (vectorised per row: n²/2 XOR-popcounts, then a dot product for the few candidates)."""
    h = np.asarray([np.uint64(p[0]) for p in prints], dtype=np.uint64)
    thumbs = np.stack([p[1] for p in prints]) if prints else np.zeros((0, THUMB * THUMB))
    pairs = []
    for i in range(len(h) - 1):
        diff = np.bitwise_xor(h[i + 1:], h[i])
        bits = np.unpackbits(diff.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
        for j in i + 1 + np.flatnonzero(bits <= distance):
            if float(thumbs[i] @ thumbs[j]) >= min_correlation:
                pairs.append((i, int(j)))
    return pairs


def duplicate_groups(paths: Sequence[str], load: Callable[[str], object], distance: int) -> np.ndarray:
    """A group id per path, equal for exact and near duplicates (see the module's docstring)."""
    return union_groups(len(paths), near_duplicates([fingerprint(load(p)) for p in paths], distance))


def combine(*labelings: Sequence | None) -> np.ndarray | None:
    """One group id per item that merges every given grouping (items sharing a group in any of them end together)."""
    given = [np.asarray(g) for g in labelings if g is not None]
    if not given:
        return None
    n = len(given[0])
    pairs = []
    for g in given:
        first: dict = {}
        for i, key in enumerate(g.tolist()):
            if key in first:
                pairs.append((first[key], i))
            else:
                first[key] = i
    return union_groups(n, pairs)


def grouped_carve(labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed) -> tuple[np.ndarray, np.ndarray]:
    """stratified_carve at the level of groups: every group goes whole to one side, the groups carved stratified by
    their label (a group's most frequent one) so the carved share of each class is about `fraction` of its groups.
    Without groups it is stratified_carve itself."""
    labels = np.asarray(labels)
    if groups is None:
        return stratified_carve(labels, fraction, seed)
    ids, inverse = np.unique(np.asarray(groups), return_inverse=True)
    group_label = np.array([np.bincount(labels[inverse == g]).argmax() for g in range(len(ids))])
    _, carved_groups = stratified_carve(group_label, fraction, seed)
    carved = np.isin(inverse, carved_groups)
    return np.flatnonzero(~carved), np.flatnonzero(carved)
