"""Triton source of the factored-key decode kernel (xKV / Single SVD prefixes, and their selective reading).

One program per (batch, KV head, token split) reads all ``g`` query heads of its KV head. For each tile of
``BLOCK_T`` tokens it rebuilds the pre-RoPE keys transposed, in two halves of the head dimension,
``Kᵀ_half = factor_halfᵀ · basisᵀ`` (a loop over rank chunks of ``BLOCK_R``), rotates them with the cos/sin
rows of those tokens (rotate-half RoPE), and scores ``q·RoPE(K)ᵀ``. ``SCORES_ONLY`` stores the raw scores;
otherwise an online softmax accumulates ``P·basis_v`` (rank ``r_v``), and the program stores its partial
softmax (see :mod:`crosskv.cache.kernels.combine`); the value factor is applied outside, once.
``HAS_INDEX``: the tile's tokens are read through ``Index`` (chosen prefix tokens per KV head).

Imported only when a kernel runs (:func:`crosskv.cache.kernels.launch.use_kernel`).
"""
import triton
import triton.language as tl


@triton.jit
def factored_kernel(
        Q, BasisK, FactorK, BasisV, Cos, Sin, Index, Bias, Scores, Acc, Max, Sum,
        tokens, rank_k, rank_v, groups, split_len, sm_scale,
        sq_b, sq_h, sq_g, sq_d,
        sbk_b, sbk_t, sbk_r,
        sfk_b, sfk_r, sfk_c,
        sbv_b, sbv_t, sbv_r,
        sc_t, sc_d,
        si_b, si_h, si_k,
        sx_b, sx_t,
        ss_b, ss_h, ss_g, ss_t,
        sa_b, sa_h, sa_s, sa_g, sa_r,
        sm_b, sm_h, sm_s, sm_g,
        HALF: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_DH: tl.constexpr, BLOCK_RV: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_BIAS: tl.constexpr,
        SCORES_ONLY: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_c = tl.arange(0, BLOCK_DH)
    offs_r = tl.arange(0, BLOCK_R)
    offs_v = tl.arange(0, BLOCK_RV)
    mask_g = offs_g < groups
    mask_c = offs_c < HALF
    mask_gc = mask_g[:, None] & mask_c[None, :]
    q_ptr = Q + b * sq_b + h * sq_h + offs_g[:, None] * sq_g + offs_c[None, :] * sq_d
    q1 = tl.load(q_ptr, mask=mask_gc, other=0.0)                         # (G, DH)
    q2 = tl.load(q_ptr + HALF * sq_d, mask=mask_gc, other=0.0)           # (G, DH)
    col = h * 2 * HALF                                                   # head h's first factor column
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_RV], tl.float32)
    start = s * split_len
    end = tl.minimum(start + split_len, tokens)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        if HAS_INDEX:
            tok = tl.load(Index + b * si_b + h * si_h + offs_t * si_k, mask=mask_t, other=0)
        else:
            tok = offs_t
        k1 = tl.zeros([BLOCK_DH, BLOCK_T], tl.float32)                   # pre-RoPE Kᵀ, first half
        k2 = tl.zeros([BLOCK_DH, BLOCK_T], tl.float32)                   # pre-RoPE Kᵀ, second half
        for r0 in range(0, rank_k, BLOCK_R):
            rr = r0 + offs_r
            mask_r = rr < rank_k
            basis_t = tl.load(BasisK + b * sbk_b + tok[None, :] * sbk_t + rr[:, None] * sbk_r,
                              mask=mask_r[:, None] & mask_t[None, :], other=0.0)          # (R, T)
            f_ptr = FactorK + b * sfk_b + rr[None, :] * sfk_r + (col + offs_c)[:, None] * sfk_c
            f_mask = mask_c[:, None] & mask_r[None, :]
            f1 = tl.load(f_ptr, mask=f_mask, other=0.0)                                  # (DH, R)
            f2 = tl.load(f_ptr + HALF * sfk_c, mask=f_mask, other=0.0)                   # (DH, R)
            k1 = tl.dot(f1, basis_t, k1, input_precision=PRECISION)
            k2 = tl.dot(f2, basis_t, k2, input_precision=PRECISION)
        cs_off = tok[None, :] * sc_t + offs_c[:, None] * sc_d
        cs_mask = mask_c[:, None] & mask_t[None, :]
        cos1 = tl.load(Cos + cs_off, mask=cs_mask, other=0.0).to(tl.float32)             # (DH, T)
        cos2 = tl.load(Cos + cs_off + HALF * sc_d, mask=cs_mask, other=0.0).to(tl.float32)
        sin1 = tl.load(Sin + cs_off, mask=cs_mask, other=0.0).to(tl.float32)
        sin2 = tl.load(Sin + cs_off + HALF * sc_d, mask=cs_mask, other=0.0).to(tl.float32)
        rot1 = (k1 * cos1 - k2 * sin1).to(q1.dtype)
        rot2 = (k2 * cos2 + k1 * sin2).to(q1.dtype)
        qk = tl.dot(q1, rot1, input_precision=PRECISION)                                 # (G, T)
        qk = tl.dot(q2, rot2, qk, input_precision=PRECISION)
        if SCORES_ONLY:
            tl.store(Scores + b * ss_b + h * ss_h + offs_g[:, None] * ss_g + offs_t[None, :] * ss_t, qk,
                     mask=mask_g[:, None] & mask_t[None, :])
        else:
            qk = qk * sm_scale
            if HAS_BIAS:
                qk += tl.load(Bias + b * sx_b + tok * sx_t, mask=mask_t, other=0.0).to(tl.float32)[None, :]
            qk = tl.where(mask_t[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(qk - m_safe[:, None])
            v = tl.load(BasisV + b * sbv_b + tok[:, None] * sbv_t + offs_v[None, :] * sbv_r,
                        mask=mask_t[:, None] & (offs_v < rank_v)[None, :], other=0.0)     # (T, RV)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
    if not SCORES_ONLY:
        tl.store(Acc + b * sa_b + h * sa_h + s * sa_s + offs_g[:, None] * sa_g + offs_v[None, :] * sa_r, acc,
                 mask=mask_g[:, None] & (offs_v < rank_v)[None, :])
        m_off = b * sm_b + h * sm_h + s * sm_s + offs_g * sm_g
        tl.store(Max + m_off, m_i, mask=mask_g)
        tl.store(Sum + m_off, l_i, mask=mask_g)
