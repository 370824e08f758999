"""hlo_cost on hand-written HLO text (no compile): loop bodies weighted by their trip count, including the TPU
compiler's windowed-matmul loops that step by 2, and a dot the compiler rewrote as a padded convolution."""
from kslm_jax.train import hlo_cost

# A loop `for (i = 0; i < 10; i += 2)` around a (8x16)@(16x16) dot and an all-reduce of its result, then one
# convolution in the layout the TPU compiler gives a projection (window 1x2, padding 1 on each side, of which
# only one tap per output reads real input: 2 x 512 tokens x 128 in x 64 out FLOPs).
MODULE = """HloModule m, is_scheduled=true

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p.1 = (s32[], f32[8,16]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  %c.i = s32[]{:T(128)S(6)} copy(%i.1)
  %x = f32[8,16]{1,0} get-tuple-element(%p.1), index=1
  %one = f32[] constant(1)
  %w = f32[16,16]{1,0} broadcast(%one), dimensions={}
  %y = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %s = f32[8,16]{1,0} all-reduce(%y), replica_groups={}, to_apply=%add
  %two = s32[] constant(2)
  %next = s32[] add(%c.i, %two)
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%next, %s)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

ENTRY %main (x0: f32[8,16], l: f32[4,128,128,1], r: bf16[128,2,32,1]) -> f32[4,128,2,32] {
  %x0 = f32[8,16]{1,0} parameter(0)
  %l = f32[4,128,128,1]{3,2,1,0} parameter(1)
  %r = bf16[128,2,32,1]{3,2,1,0} parameter(2)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%zero, %x0)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %conv = f32[4,128,2,32]{3,2,1,0} convolution(%l, %r), window={size=1x2 pad=0_0x1_1 rhs_reversal=0x1}, dim_labels=0bf1_i1o0->0b1f, metadata={op_name="k_proj"}
}
"""


def test_loops_count_their_trip_count_and_padded_convolutions_count_real_taps():
    r = hlo_cost.analyze(MODULE)
    dot = 2 * 8 * 16 * 16
    conv = 2 * (4 * 128) * 128 * (2 * 32)
    assert r["unknown_loops"] == 0
    assert r["flops"] == 5 * dot + conv        # i = 0, 2, 4, 6, 8
    assert r["collectives"]["all-reduce"] == {"count": 5, "bytes": 5 * 8 * 16 * 4}
    top = r["top_matmuls"][0]
    assert top["op_name"] == "k_proj" and top["flops"] == conv and top["times"] == 1


def test_a_loop_without_a_readable_count_is_counted_once_and_reported():
    text = MODULE.replace("%next = s32[] add(%c.i, %two)", "%next = s32[] multiply(%c.i, %two)")
    r = hlo_cost.analyze(text)
    assert r["unknown_loops"] == 1
    assert r["flops"] == 2 * 8 * 16 * 16 + 2 * (4 * 128) * 128 * (2 * 32)


# One layer's step reads its slice of a stacked (32-layer) operand through a nested fusion and writes its slice of
# a stacked result in place: 2 x 16 KiB moved plus the result slice, not the 512 KiB stacks.
STACKED = """HloModule s, is_scheduled=true

%inner (a: f32[32,128,32], i: s32[]) -> f32[1,128,32] {
  %a = f32[32,128,32]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,128,32]{2,1,0} dynamic-slice(%a, %i, %z, %z), dynamic_slice_sizes={1,128,32}
}

%outer (p0: f32[32,128,32], p1: s32[], p2: f32[32,128,32]) -> f32[32,128,32] {
  %p0 = f32[32,128,32]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %p2 = f32[32,128,32]{2,1,0} parameter(2)
  %f = f32[1,128,32]{2,1,0} fusion(%p0, %p1), kind=kLoop, calls=%inner
  %y = f32[1,128,32]{2,1,0} multiply(%f, %f)
  %z.1 = s32[] constant(0)
  ROOT %dus = f32[32,128,32]{2,1,0} dynamic-update-slice(%p2, %y, %p1, %z.1, %z.1)
}

ENTRY %main (x: f32[32,128,32], i.2: s32[], acc: f32[32,128,32]) -> f32[32,128,32] {
  %x = f32[32,128,32]{2,1,0} parameter(0)
  %i.2 = s32[] parameter(1)
  %acc = f32[32,128,32]{2,1,0} parameter(2)
  ROOT %step = f32[32,128,32]{2,1,0} fusion(%x, %i.2, %acc), kind=kLoop, calls=%outer
}
"""


def test_a_fusion_moves_the_slices_it_reads_and_writes_not_the_stacks():
    layer = 128 * 32 * 4
    assert hlo_cost.analyze(STACKED)["bytes"] == layer + 4 + layer   # slice read, index, slice written
