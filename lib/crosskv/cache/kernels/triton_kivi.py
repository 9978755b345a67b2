"""Triton source of the KIVI decode kernel: attention straight from packed 2/4/8-bit codes.

One program per (batch, KV head, token split) reads all ``g`` query heads of its KV head. Per tile of
``BLOCK_T`` tokens it unpacks the key codes (per-channel groups: a channel's ``K_GROUP`` consecutive
tokens share a scale and zero) into a ``(d, BLOCK_T)`` tile in registers, scores ``q·Kᵀ``, and with an
online softmax accumulates ``P·V`` from the value codes (per-token groups: ``V_GROUP`` consecutive
channels share a scale and zero). Codes pack ``8/BITS`` values per byte in planes: byte ``j`` of a group of
``n`` values holds values ``j, j + n/PER, …`` from its lowest bits up (:func:`crosskv.cache.quant.quantize`). Stores the program's partial softmax
(:mod:`crosskv.cache.kernels.combine`). Imported only when a kernel runs.
"""
import triton
import triton.language as tl


@triton.jit
def kivi_kernel(
        Q, KCodes, KScale, KZero, VCodes, VScale, VZero, Bias, Acc, Max, Sum,
        tokens, head_dim, groups, split_len, sm_scale,
        sq_b, sq_h, sq_g, sq_d,
        skc_b, skc_h, skc_c, skc_g, skc_y,
        sks_b, sks_h, sks_c, sks_g,
        svc_b, svc_h, svc_t, svc_g, svc_y,
        svs_b, svs_h, svs_t, svs_g,
        sx_b, sx_t,
        sa_b, sa_h, sa_s, sa_g, sa_d,
        sm_b, sm_h, sm_s, sm_g,
        BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    PER: tl.constexpr = 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < groups
    mask_d = offs_d < head_dim
    q = tl.load(Q + b * sq_b + h * sq_h + offs_g[:, None] * sq_g + offs_d[None, :] * sq_d,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)                  # (G, D)
    # value channels → (group, byte, shift): fixed for every token
    v_group = offs_d // V_GROUP
    v_byte = (offs_d % V_GROUP) % (V_GROUP // PER)
    v_shift = ((offs_d % V_GROUP) // (V_GROUP // PER)) * BITS
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = s * split_len
    end = tl.minimum(start + split_len, tokens)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        k_group = offs_t // K_GROUP
        k_byte = (offs_t % K_GROUP) % (K_GROUP // PER)
        k_shift = ((offs_t % K_GROUP) // (K_GROUP // PER)) * BITS
        mask_dt = mask_d[:, None] & mask_t[None, :]
        k_base = b * skc_b + h * skc_h + offs_d[:, None] * skc_c + k_group[None, :] * skc_g
        packed = tl.load(KCodes + k_base + k_byte[None, :] * skc_y, mask=mask_dt, other=0).to(tl.int32)
        codes = ((packed >> k_shift[None, :]) & LEVELS).to(tl.float32)                  # (D, T)
        ks_off = b * sks_b + h * sks_h + offs_d[:, None] * sks_c + k_group[None, :] * sks_g
        k_scale = tl.load(KScale + ks_off, mask=mask_dt, other=0.0).to(tl.float32)
        k_zero = tl.load(KZero + ks_off, mask=mask_dt, other=0.0).to(tl.float32)
        keys = (k_zero + codes * k_scale).to(q.dtype)                                    # (D, T)
        qk = tl.dot(q, keys, input_precision=PRECISION) * sm_scale                      # (G, T)
        if HAS_BIAS:
            qk += tl.load(Bias + b * sx_b + offs_t * sx_t, mask=mask_t, other=0.0).to(tl.float32)[None, :]
        qk = tl.where(mask_t[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(qk - m_safe[:, None])
        mask_td = mask_t[:, None] & mask_d[None, :]
        v_base = b * svc_b + h * svc_h + offs_t[:, None] * svc_t + v_group[None, :] * svc_g
        packed = tl.load(VCodes + v_base + v_byte[None, :] * svc_y, mask=mask_td, other=0).to(tl.int32)
        codes = ((packed >> v_shift[None, :]) & LEVELS).to(tl.float32)                  # (T, D)
        vs_off = b * svs_b + h * svs_h + offs_t[:, None] * svs_t + v_group[None, :] * svs_g
        v_scale = tl.load(VScale + vs_off, mask=mask_td, other=0.0).to(tl.float32)
        v_zero = tl.load(VZero + vs_off, mask=mask_td, other=0.0).to(tl.float32)
        values = (v_zero + codes * v_scale).to(q.dtype)                                  # (T, D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(q.dtype), values, acc, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    tl.store(Acc + b * sa_b + h * sa_h + s * sa_s + offs_g[:, None] * sa_g + offs_d[None, :] * sa_d, acc,
             mask=mask_g[:, None] & mask_d[None, :])
    m_off = b * sm_b + h * sm_h + s * sm_s + offs_g * sm_g
    tl.store(Max + m_off, m_i, mask=mask_g)
    tl.store(Sum + m_off, l_i, mask=mask_g)
