// Token embedding gather and its scatter-add gradient.

// out[n, j] = table[ids[n], j]; out: [N,C], table: [V,C] (ids checked < V on
// the host); total = N·C.
extern "C" __global__ void embedding_forward(void* out, int dt_out, const void* table, int dt_table,
                                             const unsigned int* ids, i64 c, i64 total) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < total; i += (i64)gridDim.x * blockDim.x) {
        i64 row = i / c, col = i - row * c;
        st(out, dt_out, i, ld(table, dt_table, (i64)ids[row] * c + col));
    }
}

// dtable[id, :] += dout[n, :] for every row n with ids[n] == id, without
// atomics: the host groups the rows by id. Block u handles the distinct id
// uniq[u], whose rows are rows[offsets[u] .. offsets[u+1]] in ascending order;
// its threads stride over the columns and each adds that id's rows in order
// (the CPU's order), so the result is deterministic.
extern "C" __global__ void embedding_backward(void* dtable, int dt_table, const void* dout, int dt_dout,
                                              const unsigned int* uniq, const unsigned int* offsets,
                                              const unsigned int* rows, i64 c) {
    unsigned int u = blockIdx.x;
    i64 id = uniq[u];
    unsigned int begin = offsets[u], end = offsets[u + 1];
    for (i64 col = threadIdx.x; col < c; col += blockDim.x) {
        i64 dst = id * c + col;
        float acc = ld(dtable, dt_table, dst);
        for (unsigned int k = begin; k < end; ++k) acc += ld(dout, dt_dout, (i64)rows[k] * c + col);
        st(dtable, dt_table, dst, acc);
    }
}
