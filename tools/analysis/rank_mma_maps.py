"""Emulates the fragment maps of CrossIo's rank products (cross_layout.cuh).

The shared-memory index functions and each lane's fragment addresses are
written as in the CUDA code, the m16n8k8 products in float64 with the PTX
fragment layout; the three products (step sizes, d dt_low, d dt_weight, the
last added to the gradient's rows as the backward adds each chunk's) are
compared with numpy for ranks 1..24, 32, 47, 48, 64, 65, 72 (padding regions
hold NaN, so a read past a region shows), and the bank-conflict degree of
every shared-memory access pattern is printed (1: none). CPU only:

    python tools/analysis/rank_mma_maps.py
"""
import numpy as np
rng=np.random.default_rng(0)
kRow=65; kLow=64
def ceil(a,b): return -(-a//b)
def weight_index(c,r): return r*32 + (((c>>2) ^ (2*(r&3) + ((r>>2)&1)))<<2) + (c&3)
def low_index(r,t): return r*kLow + (t ^ (16*(r&1) + 8*((r>>1)&1)))
def mma(A,B):  # A[lane][4], B[lane][2] -> D[lane][4] as m16n8k8
    Am=np.zeros((16,8)); Bm=np.zeros((8,8))
    for l in range(32):
        g,q=l//4,l%4
        Am[g,q],Am[g+8,q],Am[g,q+4],Am[g+8,q+4]=A[l]
        Bm[q,g],Bm[q+4,g]=B[l]
    D=Am@Bm
    return [[D[l//4,2*(l%4)],D[l//4,2*(l%4)+1],D[l//4+8,2*(l%4)],D[l//4+8,2*(l%4)+1]] for l in range(32)]
conf={}
def note(name,addrs,width=1):
    # bank conflict degree: per phase (32 lanes for 4-byte, 8-lane phases for 16-byte)
    if width==1:
        banks={}
        for a in set(addrs): banks.setdefault(a%32,set()).add(a)
        deg=max(len(v) for v in banks.values())
    else:
        deg=1
        for p in range(4):
            grp={}
            for a in set(addrs[8*p:8*p+8]): grp.setdefault((a//4)%8,set()).add(a)
            deg=max(deg,max(len(v) for v in grp.values()))
    conf[name]=max(conf.get(name,1),deg)
def check(R):
    dp=ceil(R,4)*4
    W=np.zeros((32,dp)); W[:, :R]=rng.standard_normal((32,R))
    L=np.zeros((dp,64)); L[:R]=rng.standard_normal((R,64))
    dd=rng.standard_normal((32,64)); bias=rng.standard_normal(32)
    w_s=np.full(32*dp+300,np.nan); l_s=np.full(64*dp+300,np.nan); dd_s=np.full(32*kRow,np.nan)
    for c in range(32):
        for r in range(dp): w_s[weight_index(c,r)]=W[c,r]
    for r in range(dp):
        for t in range(64): l_s[low_index(r,t)]=L[r,t]
    for c in range(32): dd_s[c*kRow:c*kRow+64]=dd[c]
    # staging store conflicts: warp = 32 consecutive t, one r
    for r in range(dp):
        for h in range(2): note('staging', [low_index(r,32*h+i) for i in range(32)])
    # GEMM1
    X=np.zeros((32,64))
    for w in range(4):
        acc={(mt,nt):np.array([[bias[4*(l//4)+2*mt+i//2] for i in range(4)] for l in range(32)]) for mt in range(2) for nt in range(2)}
        k0=0
        while k0<dp:
            full=k0+8<=dp
            A={0:[],1:[]}; B={0:[],1:[]}; a0=[];a1=[];b0={0:[],1:[]};b1={0:[],1:[]}
            for l in range(32):
                g,q=l//4,l%4
                wa=weight_index(4*g,q)+k0*32; wb=weight_index(4*g,q+4)+k0*32
                a0.append(wa); a1.append(wb)
                w0=w_s[wa:wa+4]; w1=w_s[wb:wb+4] if full else np.zeros(4)
                A[0].append([w0[0],w0[1],w1[0],w1[1]]); A[1].append([w0[2],w0[3],w1[2],w1[3]])
                for nt in range(2):
                    la=low_index(q,16*w+8*nt+(g>>1)+4*(g&1))
                    b0[nt].append(la+k0*kLow); b1[nt].append(la+(k0+4)*kLow)
                    B[nt].append([l_s[la+k0*kLow], l_s[la+(k0+4)*kLow] if full else 0.0])
            note('g1 A lds128',a0,4); note('g1 A lds128',a1,4)
            for nt in range(2): note('g1 B',b0[nt]); note('g1 B',b1[nt])
            for mt in range(2):
                for nt in range(2): acc[(mt,nt)]+=np.array(mma(A[mt],B[nt]))
            k0+=8
        for mt in range(2):
            for nt in range(2):
                for i in range(4):
                    st=[]
                    for l in range(32):
                        g,q=l//4,l%4; c=4*g+2*mt+i//2; t=16*w+8*nt+q+4*(i%2)
                        X[c,t]=acc[(mt,nt)][l][i]; st.append(c*kRow+t)
                    note('g1 store',st)
    assert np.isfinite(X).all()
    err1=np.abs(X-(bias[:,None]+W@L)).max()
    # GEMM2
    G=np.zeros((64,dp+8))
    for w in range(4):
        n0=0
        while n0<dp:
            J=min(4,ceil(dp-n0,8))
            acc=[np.zeros((32,4)) for j in range(J)]
            for ks in range(4):
                A=[];ad=[]
                for l in range(32):
                    g,q=l//4,l%4; t_row=32*(w>>1)+2*(w&1)+4*g; base=q*kRow+t_row
                    idx=[base+8*ks*kRow, base+8*ks*kRow+1, base+(8*ks+4)*kRow, base+(8*ks+4)*kRow+1]
                    A.append([dd_s[x] for x in idx]); ad.append(idx)
                for e in range(4): note('g2 A',[ad[l][e] for l in range(32)])
                for j in range(J):
                    B=[];bd=[[],[]]
                    for l in range(32):
                        g,q=l//4,l%4; grp=2*(g&3)+(g>>2); r=n0+8*j+g
                        ok= j+1<J or r<dp
                        wr=r*32+q; i0=wr+4*((2*ks)^grp); i1=wr+4*((2*ks+1)^grp)
                        B.append([w_s[i0] if ok else 0.0, w_s[i1] if ok else 0.0])
                        if ok: bd[0].append(i0); bd[1].append(i1)
                    note('g2 B',bd[0]); note('g2 B',bd[1])
                    acc[j]+=np.array(mma(A,B))
            for j in range(J):
                for l in range(32):
                    g,q=l//4,l%4; t_row=32*(w>>1)+2*(w&1)+4*g
                    for i in range(4):
                        r=n0+8*j+2*q+i%2
                        if r<R: G[t_row+i//2,r]+=acc[j][l][i]
            n0+=32
    err2=np.abs(G[:,:R]-(dd.T@W[:,:R])).max()
    # GEMM3: accumulators from zero, each chunk's product added to the
    # gradient's rows (channels c, c + 4; ranks below R)
    dw0=rng.standard_normal((32,R)); dwg=dw0.copy()
    for w in range(4):
        n0=8*(w>>1)
        while n0<dp:
            J=2 if n0+16<dp else 1
            acc=[np.zeros((32,4)) for j in range(J)]
            cs=[(l//4&3)+16*(l//16)+8*(w&1) for l in range(32)]
            for P in range(4):
                Bs={}
                for j in range(J):
                    vv=[];ad=[]
                    for l in range(32):
                        g,q=l//4,l%4
                        base=low_index(g,16+4*q) if P&1 else low_index(g,4*q)
                        idx=base+(n0+16*j)*kLow+32*(P>>1)
                        ok= j+1<J or n0+16*j+g<dp
                        vv.append(l_s[idx:idx+4] if ok else np.zeros(4))
                        if ok: ad.append(idx); assert all(l_s[idx+e]==L[n0+16*j+g,16*P+4*q+e] for e in range(4))
                    note('g3 B lds128',ad+[ad[-1]]*(32-len(ad)),4)
                    Bs[j]=vv
                for k in range(2):
                    A=[];adA=[[] for _ in range(4)]
                    for l in range(32):
                        g,q=l//4,l%4; base=cs[l]*kRow+4*q; t=16*P+2*k
                        idx=[base+t, base+4*kRow+t, base+t+1, base+4*kRow+t+1]
                        A.append([dd_s[x] for x in idx])
                        for e in range(4): adA[e].append(idx[e])
                    for e in range(4): note('g3 A',adA[e])
                    for j in range(J):
                        B=[[Bs[j][l][2*k],Bs[j][l][2*k+1]] for l in range(32)]
                        acc[j]+=np.array(mma(A,B))
            for j in range(J):
                for l in range(32):
                    q=l%4; c=cs[l]
                    for i in range(4):
                        r=n0+16*j+2*q+i%2
                        if r<R: dwg[c+4*(i//2),r]+=acc[j][l][i]
            n0+=32
    err3=np.abs(dwg-(dw0+dd@L[:R].T)).max()
    return err1,err2,err3
for R in list(range(1,25))+[32,47,48,64,65,72]:
    e=check(R)
    assert max(e)<1e-9,(R,e)
print('all R ok'); print('bank conflict degree (1 = none):',conf)
