"""Emulates the fused backward's fragment layout (scan_bwd_fragment).

The index maps of ``csrc/cuda/scan_bwd.cuh`` (``scan_bwd_fragment``,
``reduce_state_grads_fragment``), ``csrc/cuda/scan_common.cuh``
(``FragmentLane``) and ``csrc/cuda/cross_layout.cuh`` (``pair_dy_index``,
``pair_state_index``, the staging of ``Loads<true, true>``,
``store_state_grads``) are written here as in the CUDA code, for one block of
4 warps and one chunk of 64 steps:

1. Numbers: the chunk's backward (pass 1, pass 2, the reverse scan, the
   butterfly, the partial sums, the finishing lanes, the block's dB / dC sum)
   in float64 through those maps, against a direct computation without them,
   for d_state 1 .. 16 (padding states: B, C, A and the checkpoint zero, as
   the kernels stage them), with padding channels and a partial last chunk.
   Shared memory is NaN wherever nothing was staged, so a read of a wrong
   place shows.
2. Terms: the same sums with every term an indicator vector (the operations
   are linear), so each output must hold each of its terms exactly once and
   no other: dB / dC of every (step, state) over the warp's 8 channels and the
   block's 4 warps, the sums over states of every (step, channel).
3. Banks: the conflict degree (1: none) of every shared-memory access of the
   fragment layout, per warp instruction (phases of 32 lanes for 4-byte
   accesses, 16 for 8-byte, 8 for 16-byte), and of the old layout's
   corresponding finishing accesses for comparison.
4. Shared memory: the block's bytes and blocks per SM for R = 1 .. 64 (the
   layout's regions are those of scan_bwd_lanes).

CPU only:

    python tools/analysis/fragment_bwd_maps.py
"""
import numpy as np

kSteps, kRow, kPiece, kHalf, kWarps, kStates, kChannels = 64, 65, 8, 4, 4, 16, 32
kGradRow = 2 * kStates + 4  # Tile<4>::grad_row
rng = np.random.default_rng(0)


def pair_dy_index(c, t):
    return t * kChannels + (c & ~7) + 2 * (c & 3) + ((c >> 2) & 1)


def pair_state_index(t, n, kind):
    return t * 2 * kStates + 4 * (n & 7) + (((n >> 3) + 2 * kind) ^ (2 * (t & 1)))


conf = {}


def note(name, addrs, width=1):
    """Conflict degree of one warp instruction; addrs: 32 word addresses
    (None: lane inactive), width: words an access."""
    lanes = 32 // width
    deg = 1
    for ph in range(0, 32, lanes):
        banks = {}
        for a in addrs[ph:ph + lanes]:
            if a is None:
                continue
            for w in range(width):
                banks.setdefault((a + w) % 32, set()).add(a + w)
        if banks:
            deg = max(deg, max(len(v) for v in banks.values()))
    conf[name] = max(conf.get(name, 1), deg)


def lane_maps(lane, warp):
    """FragmentLane and the finishing lane's (step in half, channel)."""
    g, t = lane // 4, lane % 4
    c = [8 * warp + t, 8 * warp + t + 4]
    pairs = [(g + 8 * (i % 2), i // 2) for i in range(4)]  # (state, channel slot)
    out_k = (g & 1) + 2 * (g >> 2)
    out_c = c[0] + 4 * ((g >> 1) & 1)
    return g, t, c, pairs, out_k, out_c


def butterfly(vals):
    """reduce_state_grads_fragment over a warp: vals[lane] = (vb[2], vc[2])
    (any objects with +); returns the warp's row {index: value}."""
    w = [[None, None] for _ in range(32)]
    for lane in range(32):
        t = lane % 4
        up2 = (t & 2) != 0
        for e in range(2):
            partner = lane ^ 2
            pvb, pvc = vals[partner]
            send = pvb[e] if (partner % 4) & 2 else pvc[e]  # what the partner sends
            keep = vals[lane][1][e] if up2 else vals[lane][0][e]
            w[lane][e] = keep + send
    row = {}
    for lane in range(32):
        g, t = lane // 4, lane % 4
        up1 = (t & 1) != 0
        partner = lane ^ 1
        send = w[partner][0] if (partner % 4) & 1 else w[partner][1]
        keep = w[lane][1] if up1 else w[lane][0]
        idx = kStates * (t >> 1) + g + 8 * (t & 1)
        assert idx not in row
        row[idx] = keep + send
    note('butterfly row store (STS.32)',
         [kStates * ((l % 4) >> 1) + l // 4 + 8 * (l % 2) for l in range(32)])
    return row


def emulate(N, per_group, steps, seed):
    """One block (cblock 0), one chunk of `steps` valid steps, float64."""
    r = np.random.default_rng(seed)
    A = np.zeros((kChannels, kStates)); A[:per_group, :N] = -r.uniform(0.2, 2, (per_group, N))
    a = A * np.log2(np.e)
    dt = np.zeros((kChannels, kSteps)); u = np.zeros_like(dt); dy = np.zeros_like(dt)
    dt[:per_group, :steps] = r.uniform(0.01, 1, (per_group, steps))
    u[:per_group, :steps] = r.standard_normal((per_group, steps))
    dy[:per_group, :steps] = r.standard_normal((per_group, steps))
    B = np.zeros((kSteps, kStates)); C = np.zeros_like(B)
    B[:steps, :N] = r.standard_normal((steps, N)); C[:steps, :N] = r.standard_normal((steps, N))
    h0 = np.zeros((kChannels, kStates)); h0[:per_group, :N] = r.standard_normal((per_group, N))
    dh_in = np.zeros((kChannels, kStates)); dh_in[:per_group, :N] = r.standard_normal((per_group, N))
    D = np.zeros(kChannels); D[:per_group] = r.standard_normal(per_group)

    # Reference, without the maps: h[t] after step t.
    h = np.zeros((kSteps + 1, kChannels, kStates)); h[0] = h0
    decay = np.exp2(a[None] * dt.T[:, :, None])  # [t][c][n]
    for t in range(kSteps):
        h[t + 1] = decay[t] * h[t] + (dt[:, t] * u[:, t])[:, None] * B[t][None]
    ref = {'dB': np.zeros((kSteps, kStates)), 'dC': np.zeros((kSteps, kStates)),
           'du': np.zeros((kChannels, kSteps)), 'ddt': np.zeros((kChannels, kSteps)),
           'dA': np.zeros((kChannels, kStates))}
    dhv = dh_in.copy(); dnext = np.ones_like(dh_in)  # the carry enters with decay 1
    for t in reversed(range(kSteps)):
        dhv = dy[:, t][:, None] * C[t][None] + dnext * dhv
        dnext = decay[t]
        w = dhv * decay[t] * h[t]
        ref['dA'] += dt[:, t][:, None] * w
        sb = (dhv * B[t][None]).sum(1); sa = (a * w).sum(1)
        ref['dB'][t] = (dhv * (dt[:, t] * u[:, t])[:, None]).sum(0)
        ref['dC'][t] = (dy[:, t][:, None] * h[t + 1]).sum(0)
        ref['du'][:, t] = sb * dt[:, t] + D * dy[:, t]
        ref['ddt'][:, t] = sb * u[:, t] + sa * np.log(2)

    # Shared memory as staged (NaN elsewhere).
    u_s = np.full(kChannels * kRow, np.nan); dt_s = np.full(kChannels * kRow, np.nan)
    dy_s = np.full(kChannels * kRow, np.nan); bc_s = np.full(2 * kSteps * kStates, np.nan)
    for c in range(kChannels):
        u_s[c * kRow:c * kRow + kSteps] = u[c]; dt_s[c * kRow:c * kRow + kSteps] = dt[c]
    for thread in range(128):  # Loads<true, true>::stage
        c, j = thread % kChannels, thread // kChannels
        for k in range(kSteps // 4):
            dy_s[pair_dy_index(c, j + 4 * k)] = dy[c, j + 4 * k]
        n, js = thread % kStates, thread // kStates
        for k in range(kSteps // 8):
            t = js + 8 * k
            bc_s[pair_state_index(t, n, 0)] = B[t, n]; bc_s[pair_state_index(t, n, 1)] = C[t, n]
    for warp in range(4):
        for k in range(kSteps // 4):
            note('stage dy (STS.32)', [pair_dy_index(l, warp + 4 * k) for l in range(32)])
        for k in range(kSteps // 8):
            ts = [(32 * warp + l) // kStates + 8 * k for l in range(32)]
            for kind in range(2):
                note('stage B / C (STS.32)', [pair_state_index(ts[l], l % kStates, kind)
                                              for l in range(32)])
    assert not np.isnan(bc_s).any() and not np.isnan(dy_s[:kSteps * kChannels]).any()

    # Pass 1 and 2 per lane, then the reverse scan; the block's dB / dC.
    pieces = (steps + kPiece - 1) // kPiece
    out = {'dB': np.zeros((kSteps, kStates)), 'dC': np.zeros((kSteps, kStates)),
           'du': np.full((kChannels, kSteps), np.nan), 'ddt': np.full((kChannels, kSteps), np.nan),
           'dA': np.zeros((kChannels, kStates))}
    finished = np.zeros((kChannels, kSteps), int)
    acc_steps = {}  # (channel, accumulator) -> steps summed into dD / dbias
    grads = np.full((2, kWarps, kPiece, kGradRow), np.nan)
    lanes = {(w, l): lane_maps(l, w) for w in range(4) for l in range(32)}
    state = {}
    for w in range(4):
        for l in range(32):
            g, t, c, pairs, _, _ = lanes[(w, l)]
            # read_states: zero for padding states (the checkpoint holds N).
            hh = np.array([h0[c[ch], n] if n < N else 0.0 for n, ch in pairs])
            dh = np.array([dh_in[c[ch], n] if n < N else 0.0 for n, ch in pairs])
            av = np.array([a[c[ch], n] for n, ch in pairs])
            starts = []
            for s in range(8):
                starts.append(hh.copy())
                for tt in range(s * 8, s * 8 + 8):
                    dtv = [dt_s[c[0] * kRow + tt], dt_s[(c[0] + 4) * kRow + tt]]
                    uv = [u_s[c[0] * kRow + tt], u_s[(c[0] + 4) * kRow + tt]]
                    base = 4 * g + tt * 2 * kStates + 2 * (tt & 1)
                    bv = bc_s[base:base + 2]
                    hh = np.array([np.exp2(av[i] * dtv[i // 2]) * hh[i]
                                   + dtv[i // 2] * uv[i // 2] * bv[i % 2] for i in range(4)])
            state[(w, l)] = dict(starts=starts, dh=dh, dnext=np.ones(4), dA=np.zeros(4), av=av)
    for s in reversed(range(pieces)):
        buf = grads[s & 1]; buf[:] = np.nan
        hs = {}
        for w in range(4):
            for l in range(32):
                g, t, c, pairs, _, _ = lanes[(w, l)]
                st = state[(w, l)]; prev = st['starts'][s]; seq = []
                for k in range(8):
                    tt = s * 8 + k
                    dtv = [dt_s[c[0] * kRow + tt], dt_s[(c[0] + 4) * kRow + tt]]
                    uv = [u_s[c[0] * kRow + tt], u_s[(c[0] + 4) * kRow + tt]]
                    base = 4 * g + tt * 2 * kStates + 2 * (tt & 1)
                    bv = bc_s[base:base + 2]
                    prev = np.array([np.exp2(st['av'][i] * dtv[i // 2]) * prev[i]
                                     + dtv[i // 2] * uv[i // 2] * bv[i % 2] for i in range(4)])
                    seq.append(prev)
                hs[(w, l)] = seq
        for w in range(4):
            part = np.full((kHalf, 32, 4), np.nan)
            for k in reversed(range(8)):
                tt = s * 8 + k
                vals = []
                rd = {'dt': [], 'dt4': [], 'dy pair (LDS.64)': [], 'B / C (LDS.128)': []}
                for l in range(32):
                    g, t, c, pairs, _, _ = lanes[(w, l)]
                    st = state[(w, l)]
                    v4 = bc_s[tt * 2 * kStates + 4 * g:tt * 2 * kStates + 4 * g + 4]
                    odd = tt & 1
                    bv = [v4[2], v4[3]] if odd else [v4[0], v4[1]]
                    cv = [v4[0], v4[1]] if odd else [v4[2], v4[3]]
                    gi = pair_dy_index(c[0], 0) + tt * kChannels
                    gy = dy_s[gi:gi + 2]
                    dtv = [dt_s[c[0] * kRow + tt], dt_s[(c[0] + 4) * kRow + tt]]
                    dtu = [dtv[0] * u_s[c[0] * kRow + tt], dtv[1] * u_s[(c[0] + 4) * kRow + tt]]
                    rd['dt'].append(c[0] * kRow + tt); rd['dt4'].append((c[0] + 4) * kRow + tt)
                    rd['dy pair (LDS.64)'].append(gi); rd['B / C (LDS.128)'].append(tt * 2 * kStates + 4 * g)
                    vb = [None, None]; vc = [None, None]; sb = [None, None]; sa = [None, None]
                    for i in range(4):
                        e, hch = i % 2, i // 2
                        dec = np.exp2(st['av'][i] * dtv[hch])
                        st['dh'][i] = gy[hch] * cv[e] + st['dnext'][i] * st['dh'][i]
                        st['dnext'][i] = dec
                        prv = st['starts'][s][i] if k == 0 else hs[(w, l)][k - 1][i]
                        ww = st['dh'][i] * dec * prv
                        st['dA'][i] += dtv[hch] * ww
                        sa[hch] = st['av'][i] * ww if e == 0 else sa[hch] + st['av'][i] * ww
                        sb[hch] = st['dh'][i] * bv[e] if e == 0 else sb[hch] + st['dh'][i] * bv[e]
                        vb[e] = st['dh'][i] * dtu[0] if hch == 0 else vb[e] + st['dh'][i] * dtu[1]
                        vc[e] = gy[0] * hs[(w, l)][k][i] if hch == 0 else vc[e] + gy[1] * hs[(w, l)][k][i]
                    vals.append((vb, vc))
                    part[k % kHalf, l] = [sb[0], sa[0], sb[1], sa[1]]
                note('scan dt / u rows (LDS.32)', rd['dt']); note('scan dt / u rows (LDS.32)', rd['dt4'])
                note('scan dy pair (LDS.64)', rd['dy pair (LDS.64)'], 2)
                note('scan B / C (LDS.128)', rd['B / C (LDS.128)'], 4)
                note('scan B (LDS.64)', [x + 2 * (tt & 1) for x in rd['B / C (LDS.128)']], 2)
                note('partials store (STS.128)', [((k % kHalf) * 32 + l) * 4 for l in range(32)], 4)
                row = butterfly(vals)
                for idx, v in row.items():
                    buf[w, k, idx] = v
                if k % kHalf:
                    continue
                flat = part.reshape(-1)
                rd_part = [[] for _ in range(8)]; rd_tile = []; rd_dy = []
                for l in range(32):
                    g, t, c, pairs, out_k, out_c = lanes[(w, l)]
                    part_out = (out_k * 32 + t) * 4 + 2 * ((g >> 1) & 1)
                    pe = part_out + 16 * (g & 1); po = part_out + 16 - 16 * (g & 1)
                    v = []
                    for j in range(0, 8, 2):
                        v.append(flat[pe + 16 * j:pe + 16 * j + 2]); rd_part[j].append(pe + 16 * j)
                        v.append(flat[po + 16 * j:po + 16 * j + 2]); rd_part[j + 1].append(po + 16 * j)
                    sbv = ((v[0][0] + v[1][0]) + (v[2][0] + v[3][0])) + ((v[4][0] + v[5][0]) + (v[6][0] + v[7][0]))
                    sav = ((v[0][1] + v[1][1]) + (v[2][1] + v[3][1])) + ((v[4][1] + v[5][1]) + (v[6][1] + v[7][1]))
                    tk = tt + out_k; at = out_c * kRow + tk
                    # the kernel's out_at + t and out_dy + t * 32
                    assert at == out_c * kRow + out_k + tt
                    assert pair_dy_index(out_c, tk) == pair_dy_index(out_c, out_k) + tt * kChannels
                    rd_tile.append(at); rd_dy.append(pair_dy_index(out_c, tk))
                    out['du'][out_c, tk] = sbv * dt_s[at] + D[out_c] * dy_s[pair_dy_index(out_c, tk)]
                    out['ddt'][out_c, tk] = sbv * u_s[at] + sav * np.log(2)
                    finished[out_c, tk] += 1
                    acc_steps.setdefault((w, l, k // kHalf), set()).add((out_c, tk % kPiece))
                for j in range(8):
                    note('finish partials (LDS.64)', rd_part[j], 2)
                note('finish dt / u rows (LDS.32, STS.32)', rd_tile)
                note('finish dy (LDS.32)', rd_dy)
        # store_state_grads: thread j = value, steps threadIdx / 32 (+ 4).
        for thread in range(128):
            j = thread % 32; n = j % kStates
            if n >= N:
                continue
            for i in range(2):
                t = thread // 32 + 4 * i
                if s * 8 + t >= steps:
                    continue
                v = buf[0, t, j]
                for w in range(1, 4):
                    v = v + buf[w, t, j]
                out['dC' if j >= kStates else 'dB'][s * 8 + t, n] += v
        for t in range(4):  # the reading warp's steps t, t + 4; warps' rows w
            for i in range(2):
                for w in range(4):
                    note('store_state_grads (LDS.32)',
                         [(w * kPiece + t + 4 * i) * kGradRow + l for l in range(32)])
    for w in range(4):
        for l in range(32):
            g, t, c, pairs, _, _ = lanes[(w, l)]
            for i, (n, ch) in enumerate(pairs):
                if n < N and c[ch] < per_group:
                    out['dA'][c[ch], n] += state[(w, l)]['dA'][i]
    # Checks.
    valid = np.zeros((kChannels, kSteps), bool); valid[:per_group, :steps] = True
    full = pieces * kPiece
    assert (finished[:, :full] == 1).all() and (finished[:, full:] == 0).all()
    for key, ts in acc_steps.items():
        assert len(ts) == 1, 'a lane\'s dD / dbias accumulator: one channel, one t % kPiece'
    err = 0.0
    for key in ('dB', 'dC'):
        x, y = out[key][:steps, :N], ref[key][:steps, :N]
        assert np.isfinite(x).all()
        err = max(err, np.abs(x - y).max() / (np.abs(y).max() + 1e-300))
        assert (out[key][:, N:] == 0).all() and (out[key][steps:] == 0).all()
    for key in ('du', 'ddt'):
        x, y = out[key][valid], ref[key][valid]
        assert np.isfinite(x).all()
        err = max(err, np.abs(x - y).max() / np.abs(y).max())
    x, y = out['dA'][:per_group, :N], ref['dA'][:per_group, :N]
    err = max(err, np.abs(x - y).max() / np.abs(y).max())
    return err


def term_check():
    """Each term once: indicator vectors for one warp's step (dB / dC over
    channels, the sums over states), and the block sum over warps."""
    nterms = 8 * kStates * 2
    def ind(n, ch, kind):  # term (state n, warp channel ch, dB or dC)
        v = np.zeros(nterms, int); v[(kind * kStates + n) * 8 + ch] = 1; return v
    vals = []
    for l in range(32):
        g, t, c, pairs, _, _ = lane_maps(l, 0)
        vb = [None, None]; vc = [None, None]
        for i, (n, slot) in enumerate(pairs):
            e, ch = i % 2, c[slot]
            vb[e] = ind(n, ch, 0) if slot == 0 else vb[e] + ind(n, ch, 0)
            vc[e] = ind(n, ch, 1) if slot == 0 else vc[e] + ind(n, ch, 1)
        vals.append((vb, vc))
    row = butterfly(vals)
    assert sorted(row) == list(range(32))
    for idx, v in row.items():
        want = np.zeros(nterms, int)
        for ch in range(8):
            want[idx * 8 + ch] = 1
        assert (v == want).all(), idx
    # Sums over states: term (state n) of channel ch, through the partials.
    part = np.zeros((32, 4, 8 * kStates), int)
    for l in range(32):
        g, t, c, pairs, _, _ = lane_maps(l, 0)
        for i, (n, slot) in enumerate(pairs):
            part[l, 2 * slot, c[slot] * kStates + n] += 1
    for l in range(32):
        g, t, c, pairs, out_k, out_c = lane_maps(l, 0)
        h = (g >> 1) & 1
        tot = sum(part[4 * (j ^ (g & 1)) + t, 2 * h] for j in range(8))
        want = np.zeros(8 * kStates, int); want[out_c * kStates:(out_c + 1) * kStates] = 1
        assert (tot == want).all(), l
    # Finishing lanes: every (step of the half, channel) once.
    cover = sorted((lane_maps(l, 0)[4], lane_maps(l, 0)[5]) for l in range(32))
    assert cover == sorted((k, c) for k in range(4) for c in range(8))


def smem_table():
    """Bytes of the backward (SmemLayout<4, kBackward> + CrossIo's extra)
    and blocks per SM (233,472 bytes, 1,024 reserved a block; registers:
    4 blocks without kept decays, 3 with). One buffer of a piece's dB / dC
    terms; no d dt_weight rows (each chunk adds its own to the gradient)."""
    tiles = 3 * kChannels * kRow + 2 * kSteps * kStates
    grads = kWarps * kPiece * kGradRow
    part = 2 * 128 * kPiece
    rows = []
    for R in range(1, 65):
        pitch = (R + 3) // 4 * 4
        extra = kSteps + 4 + (kChannels + kSteps) * pitch
        b = 4 * (tiles + grads + part + extra)
        by_smem = 233472 // (b + 1024)
        keep = by_smem < 4
        rows.append((R, b, min(by_smem, 3 if keep else 4), keep))
    # What the fragment layout uses of the regions.
    assert kHalf * 32 * 4 <= 2 * kPiece * 32  # a warp's partials of a half piece
    assert 2 * kStates <= kGradRow            # a step's values in a grad_row
    assert kSteps * kChannels <= kChannels * kRow and 2 * kSteps * kStates == 2 * 1024
    return rows


def old_finish_conflicts():
    """scan_bwd_lanes' finishing (Q = 4): lane channel lane % 8, steps
    lane / 8 + 4 i of the piece, rows of kRow: the same tiles' accesses."""
    for w in range(4):
        for s in range(8):
            for i in range(2):
                note('old layout: finish dt / u / dy rows (LDS.32, STS.32)',
                     [(8 * w + l % 8) * kRow + s * 8 + l // 8 + 4 * i for l in range(32)])


if __name__ == '__main__':
    old_finish_conflicts()
    term_check()
    worst = 0.0
    for N in range(1, 17):
        for per_group, steps in ((32, 64), (29, 64), (32, 37), (5, 1)):
            worst = max(worst, emulate(N, per_group, steps, seed=N * 100 + steps))
    assert worst < 1e-12, worst
    print(f'N = 1..16, padding channels, partial chunks: largest relative error {worst:.1e}')
    print('every dB / dC and every sum over states holds its terms once')
    print('bank conflict degree (1 = none):')
    for k, v in conf.items():
        print(f'  {k}: {v}')
    rows = smem_table()
    for R, b, blocks, keep in rows:
        if R in (1, 6, 8, 12, 13, 16, 24, 32, 48, 52, 56, 60, 64):
            print(f'  R = {R}: {b} bytes, {blocks} blocks/SM ({"keep" if keep else "no keep"})')
