"""tools/analysis/bwd_schedule_sass.py: the SASS parsing and load-to-use
distances it reports, on a hand-written listing, and the pass markers it
reads from the backward's source (they must stay in scan_bwd.cuh)."""
import os.path as osp

import bwd_schedule_sass as sched

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
LISTING = '''\
\t.section\t.text.kernel_a,"ax",@progbits
        //## File "/x/csrc/cuda/scan_bwd.cuh", line 540
        /*0000*/                   LDS.128 R4, [R2] ;
        /*0010*/                   NOP ;
        /*0020*/                   FADD R8, R9, R10 ;
        /*0030*/              @P0  FADD R5, R11, R12 ;
        //## File "/x/csrc/cuda/scan_bwd.cuh", line 541
        /*0040*/                   FFMA R13, R7, R8, R9 ;
        /*0050*/                   MUFU.EX2 R14, R15 ;
        /*0060*/                   MOV R14, R3 ;
        /*0070*/                   STS [R2], R14 ;
'''


def test_listing_parsed_with_widths_lines_and_guards(tmp_path):
    path = tmp_path / 'k.sass'
    path.write_text(LISTING)
    code = sched.parse_listing(str(path))['kernel_a']
    assert [i.op for i in code] == [
        'LDS.128', 'FADD', 'FADD', 'FFMA', 'MUFU.EX2', 'MOV', 'STS']  # no NOP
    assert code[0].writes == {4, 5, 6, 7} and code[0].reads == {2}
    assert code[2].guarded and not code[1].guarded
    assert code[0].lines == (('scan_bwd.cuh', 540), )
    assert code[3].lines == (('scan_bwd.cuh', 541), )
    assert code[6].reads == {2, 14} and not code[6].writes


def test_first_reader_counts_to_the_use_and_stops_at_overwrites(tmp_path):
    path = tmp_path / 'k.sass'
    path.write_text(LISTING)
    code = sched.parse_listing(str(path))['kernel_a']
    # R4..R7 loaded; the guarded FADD may not overwrite R5; FFMA reads R7
    assert sched.first_reader(code, 0) == 3
    # MUFU's R14 is overwritten by the MOV before anything reads it
    assert sched.first_reader(code, 4) is None


def test_pass_markers_found_in_the_backward_source():
    bounds, passes = sched.pass_ranges(
        osp.join(REPO, 'csrc', 'cuda', 'scan_bwd.cuh'))
    assert bounds[0] < bounds[1]
    order = ['pass 1', 'states', 'reverse', 'finish', 'piece end']
    starts = [passes[p][0] for p in order]
    assert starts == sorted(starts) and starts[0] > bounds[0]
    assert all(a <= b for a, b in passes.values())


def test_report_counts_a_chunks_spills_by_pass(tmp_path, capsys):
    """A chunk from the barrier before pass 1: pass 1 (with piece 7), then
    pieces whose reverse scans are recognised; spills counted per pass."""
    def at(line, *ops):
        return [f'        //## File "/x/csrc/cuda/scan_bwd.cuh", line {line}'] + [
            f'        /*{k:04x}*/                   {op} ;' for k, op in enumerate(ops)]

    rows = ['\t.section\t.text.kernel_b,"ax",@progbits']
    rows += at(5, 'BAR.SYNC.DEFER_BLOCKING 0x0')
    rows += at(10, 'STL [R1], R4', 'FFMA R4, R5, R6, R7')  # pass 1
    rows += at(30, 'LDL R4, [R1]', 'FADD R8, R4, R9')  # piece 7's reverse scan
    rows += at(50, 'BAR.SYNC.DEFER_BLOCKING 0x0')
    for _ in range(2):  # two steady pieces
        rows += at(20, 'FMUL R4, R5, R6')
        rows += at(30, 'LDL R4, [R1]', 'LDS R8, [R2]', 'FADD R9, R8, R4')
        rows += at(50, 'BAR.SYNC.DEFER_BLOCKING 0x0')
    path = tmp_path / 'k.sass'
    path.write_text('\n'.join(rows) + '\n')
    code = sched.parse_listing(str(path))['kernel_b']
    passes = {'pass 1': (10, 19), 'states': (20, 29), 'reverse': (30, 39),
              'finish': (40, 49), 'piece end': (50, 60)}
    sched.report(code, (1, 60), passes)
    out = capsys.readouterr().out
    assert ('spill instructions in the chunk 4 (pass 1 1, reverse 3), '
            'in the kernel 4') in out
    # a piece from its barrier on: the barrier and 4 instructions
    assert 'steady piece 5.0, its reverse scan 3.0' in out
