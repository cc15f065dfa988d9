"""The one-token grouped-query attention kernel against its reference and against torch's SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_cases import DEVICE, ON_GPU, reference, rel_err, tol

from countdown.kernels import gqa_attention as da

DTYPES = (torch.bfloat16, torch.float16, torch.float32) if ON_GPU else (torch.float16, torch.float32)
# (batch, key/value heads, query heads per key/value head, slots, head dim): odd sizes; slots past one
# split (64) so the split-and-combine path runs, a head dim that is not a power of two
CASES = [(1, 2, 4, 200, 24), (3, 3, 3, 37, 16), (2, 1, 7, 130, 40), (16, 2, 1, 70, 16)]
if ON_GPU:
    CASES += [(1, 8, 4, 256, 128), (16, 8, 4, 256, 128), (4, 8, 4, 4096, 128), (2, 4, 8, 1000, 96)]


def make(batch, heads, group, slots, dim, dtype, seed, mask_kind="bool", mask_rows=None):
    """Fresh q [B, H, G, D] (a strided view, as a transposed query is), cache k, v [B, H, L, D] and a mask
    hiding a different tail (and a few inner slots) of every row."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, group, heads, dim, generator=g).transpose(1, 2)  # not contiguous
    k = torch.randn(batch, heads, slots, dim, generator=g)
    v = torch.randn(batch, heads, slots, dim, generator=g)
    rows = batch if mask_rows is None else mask_rows
    filled = torch.randint(1, slots + 1, (rows,), generator=g)
    visible = torch.arange(slots)[None, :] < filled[:, None]
    visible &= torch.rand(rows, slots, generator=g) > 0.1
    visible[:, 0] = True  # every row sees a slot (none seen is NaN in SDPA too)
    mask = visible.view(rows, 1, 1, slots)
    if mask_kind == "additive":
        mask = torch.zeros(rows, 1, 1, slots).masked_fill(~mask, torch.finfo(dtype).min)
    elif mask_kind == "none":
        mask = None
    to = dict(device=DEVICE)
    return (q.to(dtype=dtype, **to), k.to(dtype=dtype, **to), v.to(dtype=dtype, **to),
            None if mask is None else mask.to(**to) if mask.dtype == torch.bool else mask.to(dtype=dtype, **to))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", ["bool", "additive", "none"])
def test_matches_reference_and_sdpa(case, dtype, mask_kind):
    q, k, v, mask = make(*case, dtype, seed=sum(case), mask_kind=mask_kind)
    out = da.decode_attention(q, k, v, mask)
    want = reference.decode_attention(q, k, v, mask)
    assert out.is_contiguous()
    assert rel_err(out, want) < tol(dtype), rel_err(out, want)
    sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask if mask is None or
                                          mask.dtype == torch.bool else mask.float()).to(dtype)
    assert rel_err(out, sdpa) < tol(dtype)


@pytest.mark.parametrize("skip_hidden", [False, True])
def test_hidden_slots_never_count(skip_hidden):
    # NaN in every slot the mask hides (memory a cache never wrote): the output is that of the visible ones,
    # whether the kernel loads hidden slots and discards them (short caches) or skips their loads (long)
    q, k, v, mask = make(2, 2, 3, 150, 16, torch.float32, seed=5)
    want = reference.decode_attention(q, k, v, mask)
    hidden = ~mask.view(2, 1, 150, 1).expand(2, 2, 150, 16)
    k, v = k.masked_fill(hidden, float("nan")), v.masked_fill(hidden, float("nan"))
    out = da.launch(q, k, v, mask, 1 / 4, skip_hidden_from=0 if skip_hidden else 10**9)
    assert rel_err(out, want) < tol(torch.float32)


def test_scale_mask_shared_by_rows_and_a_cache_view():
    # a mask of one row for every row, an explicit scale, and a cache that is a slice of a longer one
    q, k, v, mask = make(3, 2, 4, 150, 32, torch.float32, seed=4, mask_rows=1)
    k, v = k[:, :, :101], v[:, :, :101]  # strided views
    mask = mask[..., :101]
    out = da.decode_attention(q, k, v, mask, scale=0.3)
    assert rel_err(out, reference.decode_attention(q, k, v, mask, scale=0.3)) < tol(torch.float32)


def test_tickets_are_zero_again_after_every_call():
    # the last split of each (row, head) pair resets its ticket, so calls (and graph replays) can repeat
    q, k, v, mask = make(2, 2, 4, 200, 16, torch.float32, seed=9)
    first = da.decode_attention(q, k, v, mask)
    assert not da._tickets(q.device, 4)[:4].any()
    assert torch.equal(da.decode_attention(q, k, v, mask), first)


@pytest.mark.parametrize("bad, message", [
    (lambda q, k, v, m: (q[..., :-1], k, v, m), "k and v must be"),
    (lambda q, k, v, m: (q, k, v.half() if v.dtype != torch.float16 else v.float(), m), "dtypes"),
    (lambda q, k, v, m: (q, k, v, m[..., :-1]), "mask must be"),
    (lambda q, k, v, m: (q, k, v, m.int()), "mask must be bool or float"),
    (lambda q, k, v, m: (q[0], k, v, m), "4-D"),
])
def test_bad_input_is_named(bad, message):
    args = bad(*make(2, 2, 3, 20, 16, torch.float32, seed=1))
    assert message in da.decode_attention_unavailable_reason(*args)
    with pytest.raises(ValueError, match=message):
        da.decode_attention(*args)


def test_registered_op_schema_and_fake():
    q, k, v, mask = make(2, 2, 4, 100, 16, torch.float32, seed=2)
    torch.library.opcheck(torch.ops.countdown.decode_attention.default, (q, k, v, mask, 0.25),
                          test_utils=("test_schema", "test_faketensor"))
