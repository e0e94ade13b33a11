"""The per-token streaming kernels in TileLang: layer_input = sum_i h_pre[i] x[i] and its
dh_pre = g_li . x[i], shared by mHC and HC. Both compile for the CPU "c" target too."""
import functools

from kernels.tilelang.common import block_c, compile_kernel


# ====================================================================== per-token streaming kernels
@functools.cache
def build_apply(n: int, C: int, dtype: str, cpu: bool):
    """layer_input[t] = sum_i h_pre[t, i] x[t, i]; one CTA per token, C in BLOCK chunks."""
    import tilelang.language as T

    blk = block_c(C)
    nch = -(-C // blk)
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.prim_func
    def mhc_apply(x: T.Tensor((Tn, n, C), dtype), h_pre: T.Tensor((Tn, n), f32),
                  out: T.Tensor((Tn, C), dtype)):
        with T.Kernel(Tn, threads=max(32, blk // 8)) as t:
            xl = T.alloc_fragment((n, blk), f32)
            ol = T.alloc_fragment((blk,), f32)
            hp = T.alloc_fragment((n,), f32)
            T.copy(h_pre[t, 0], hp)
            for c0 in T.serial(nch):
                T.copy(x[t, 0, c0 * blk], xl)
                for c in T.Parallel(blk):
                    ol[c] = 0.0
                    for i in T.unroll(n):
                        ol[c] += hp[i] * xl[i, c]
                T.copy(ol, out[t, c0 * blk])

    return compile_kernel(mhc_apply, cpu)


@functools.cache
def build_dhpre(n: int, C: int, dtype: str, cpu: bool):
    """dh_pre[t, i] = sum_c g_li[t, c] x[t, i, c]; one CTA per token, one reducer per stream."""
    import tilelang.language as T

    blk = block_c(C)
    nch = -(-C // blk)
    Tn = T.dynamic("T")
    f32 = "float32"

    @T.prim_func
    def mhc_dhpre(x: T.Tensor((Tn, n, C), dtype), g: T.Tensor((Tn, C), dtype),
                  dh: T.Tensor((Tn, n), f32)):
        with T.Kernel(Tn, threads=max(32, blk // 8)) as t:
            xl = T.alloc_fragment((n, blk), f32)
            gl = T.alloc_fragment((blk,), f32)
            if cpu:
                acc = T.alloc_local((n,), f32)
                for i in T.serial(n):
                    acc[i] = 0.0
            else:
                acc = T.alloc_reducer((n,), f32, op="sum")
                T.reducer_init(acc)
            for c0 in T.serial(nch):
                T.copy(x[t, 0, c0 * blk], xl)
                T.copy(g[t, c0 * blk], gl)
                for i in T.unroll(n):
                    for c in T.Parallel(blk):
                        if cpu:
                            acc[i] += gl[c] * xl[i, c]
                        else:
                            T.reducer_update(acc[i], gl[c] * xl[i, c])
            if cpu:
                for i in T.serial(n):
                    dh[t, i] = acc[i]
            else:
                tot = T.alloc_fragment((n,), f32)
                T.finalize_reducer(acc, tot)
                for i in T.Parallel(n):
                    dh[t, i] = tot[i]

    return compile_kernel(mhc_dhpre, cpu)
