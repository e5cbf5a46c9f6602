"""Static schedule figures of the fused backward (scan_bwd_fragment) in SASS.

Reads the ``nvdisasm -gi`` listing of a cubin holding
``scan_bwd_kernel<CrossIo<...>, ...>`` and the scan_bwd.cuh it was compiled
from, and prints for each such kernel: the instructions of a chunk's pieces
(pass 1 and the 8 pieces, between block barriers), of a steady piece
(pieces 6 .. 0) and of its reverse scan, spill instructions (a chunk's by
pass), the mean distance from each shared load (LDS / LDS.64 / LDS.128),
MUFU and SHFL to its first reader (instructions in program order, the
reader counted) per pass, and the floating-point instructions of a chunk.
CPU only; see
docs/scan_kernel_notes.md, "Backward schedule against latency":

    nvdisasm -gi cross_scan.sm_90.cubin > bwd.sass
    python tools/analysis/bwd_schedule_sass.py bwd.sass csrc/cuda/scan_bwd.cuh
"""
import argparse
import collections
import re
import statistics

INSTRUCTION = re.compile(r'^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;')
LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
SECTION = re.compile(r'^\s*\.section\s+\.text\.(\S+?),')
REGISTER = re.compile(r'\bR(\d+)\b')
# Opcodes whose operands are all read (no register written).
NO_DESTINATION = ('STS', 'ST', 'STG', 'STL', 'RED', 'REDG', 'BAR', 'BRA', 'EXIT',
                  'BSYNC', 'BSSY', 'WARPSYNC', 'CALL', 'RET', 'MEMBAR', 'ATOMS',
                  'DEPBAR', 'ISETP', 'FSETP')
FLOAT_OPS = ('FFMA', 'FMUL', 'FADD', 'MUFU', 'FSEL', 'SHFL', 'LDS', 'STS')
KERNELS = {'CrossIoIfEELb0': 'float32, no kept decays',
           'CrossIoIfEELb1': 'float32, kept decays',
           'CrossIoIN3c108BFloat16EEELb0': 'bfloat16, no kept decays',
           'CrossIoIN3c108BFloat16EEELb1': 'bfloat16, kept decays'}

Instruction = collections.namedtuple('Instruction', 'op text writes reads guarded lines')


def registers(operand, width):
    """The registers an operand names (width consecutive ones a register)."""
    found = []
    for match in REGISTER.finditer(operand):
        found += range(int(match.group(1)), int(match.group(1)) + width)
    return found


def parse_instruction(text, lines):
    """An Instruction from one SASS line."""
    body = re.sub(r'^@!?U?P\w+\s+', '', text)
    op, _, rest = body.partition(' ')
    operands = [o.strip() for o in rest.split(',')] if rest else []
    base = op.split('.')[0]
    width = 4 if '.128' in op else 2 if ('.64' in op or '.WIDE' in op) else 1
    if base == 'SHFL':  # predicate first, then the destination
        operands = operands[1:]
    writes, reads = [], []
    for k, operand in enumerate(operands):
        if operand.startswith('['):  # address: 64-bit where marked
            reads += registers(operand.replace('.64', ''), 2 if '.64' in operand else 1)
        elif base in NO_DESTINATION:
            reads += registers(operand, width if base in ('STS', 'STG', 'STL') else 1)
        elif k == 0:
            writes += registers(operand, width if base in ('LDS', 'LDL', 'IMAD', 'MOV') or
                                '.WIDE' in op else 1)
        else:
            reads += registers(operand, 1)
    return Instruction(op, text, frozenset(writes), frozenset(reads), body != text,
                       tuple(lines))


def parse_listing(path):
    """{function: [Instruction]} of an nvdisasm -gi listing, NOPs left out."""
    functions, name, pending, lines = {}, None, [], ()
    with open(path) as listing:
        for row in listing:
            section = SECTION.match(row)
            if section:
                name = section.group(1)
                functions[name], pending, lines = [], [], ()
                continue
            if name is None:
                continue
            line = LINE.search(row)
            if line:
                pending.append((line.group(1).rsplit('/', 1)[-1], int(line.group(2))))
                continue
            instruction = INSTRUCTION.match(row)
            if instruction:
                if pending:
                    lines, pending = tuple(pending), []
                if not instruction.group(2).startswith('NOP'):
                    functions[name].append(parse_instruction(instruction.group(2), lines))
    return functions


def pass_ranges(source):
    """Line ranges of scan_bwd_fragment and of its passes, from markers."""
    text = open(source).read().split('\n')

    def find(marker, start=0):
        for i in range(start, len(text)):
            if marker in text[i]:
                return i + 1
        raise LookupError(f'{source}: no line with {marker!r} after line {start}')

    first = find('__device__ __forceinline__ void scan_bwd_fragment')
    last = find('// kKeepDecays: a piece', first)
    pass1 = find('// Pass 1: the state at the start', first)
    pass2 = find('// Pass 2: pieces in reverse', first)
    states = find("// The piece's states and (if kept)", pass2)
    try:
        reverse = find("// The reverse scan's schedule", states)
    except LookupError:  # before the schedule variants
        reverse = find('for (int k = kPiece - 1; k >= 0; --k)', states)
    finish = find('// du and d(delta) of the half', reverse)
    piece_end = find("// The block's dB / dC of the piece", finish)
    return (first, last), {'pass 1': (pass1, pass2 - 1), 'states': (pass2, reverse - 1),
                           'reverse': (reverse, finish - 1),
                           'finish': (finish, piece_end - 1), 'piece end': (piece_end, last)}


def pass_of(instruction, bounds, passes):
    """The pass of the innermost scan_bwd_fragment line of an instruction."""
    for file, line in instruction.lines:
        if file == 'scan_bwd.cuh' and bounds[0] <= line <= bounds[1]:
            return next((p for p, (a, b) in passes.items() if a <= line <= b), 'other')
    return 'other'


def first_reader(code, i):
    """Instructions from code[i] to the first one reading what it wrote."""
    live = set(code[i].writes)
    for j in range(i + 1, len(code)):
        if live & code[j].reads:
            return j - i
        if not code[j].guarded:  # a guarded write may not happen
            live -= code[j].writes
        if not live:
            return None
    return None


def mean_of(values):
    """The mean, NaN for none."""
    return statistics.mean(values) if values else float('nan')


def report(code, bounds, passes):
    """Prints one kernel's figures."""
    where = [pass_of(x, bounds, passes) for x in code]
    barriers = [i for i, x in enumerate(code) if x.op.startswith('BAR')]
    first = where.index('pass 1')
    start = max(b for b in barriers if b < first)
    marks = [b for b in barriers if b >= start]
    pieces = [(a, b) for a, b in zip(marks, marks[1:]) if 'reverse' in where[a:b]]
    steady = pieces[1:]
    piece = mean_of([b - a for a, b in steady])
    reverse = mean_of([where[a:b].count('reverse') for a, b in steady])
    advance = where[pieces[0][0]:pieces[0][1]].count('pass 1') / 7
    chunk = sum(b - a for a, b in pieces)
    spilled = collections.Counter(
        where[i] for i in range(pieces[0][0], pieces[-1][1]) if code[i].op[:3] in ('STL', 'LDL'))
    by_pass = ', '.join(f'{name} {spilled[name]}' for name in (*passes, 'other') if spilled[name])
    print(f'  instructions: chunk (pass 1 + 8 pieces) {chunk}, steady piece {piece:.1f}, '
          f'its reverse scan {reverse:.1f}, pass-1 advance of 8 steps {advance:.1f}; '
          f'spill instructions in the chunk {sum(spilled.values())}'
          f'{f" ({by_pass})" if by_pass else ""}, in the kernel '
          f'{sum(1 for x in code if x.op[:3] in ("STL", "LDL"))}')
    for name in ('pass 1', 'states', 'reverse'):
        span = pieces[:1] if name == 'pass 1' else steady
        cells = []
        for kind in ('LDS', 'LDS.64', 'LDS.128', 'MUFU', 'SHFL'):
            distances = [first_reader(code, i) for a, b in span for i in range(a, b)
                         if where[i] == name and (code[i].op == kind or
                                                  (kind in ('MUFU', 'SHFL') and
                                                   code[i].op.startswith(kind)))]
            distances = [d for d in distances if d is not None]
            if distances:
                cells.append(f'{kind} {mean_of(distances):.1f} ({len(distances)})')
        print(f'  to first use, {name}: ' + ', '.join(cells))
    ops = collections.Counter(x.op.split('.')[0] for a, b in pieces for x in code[a:b])
    print('  a chunk: ' + ', '.join(f'{op} {ops[op]}' for op in FLOAT_OPS))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('listing', help='nvdisasm -gi output of the cubin')
    parser.add_argument('source', help='the scan_bwd.cuh it was compiled from')
    args = parser.parse_args(argv)
    bounds, passes = pass_ranges(args.source)
    functions = parse_listing(args.listing)
    found = False
    for key, label in KERNELS.items():
        for name, code in functions.items():
            if 'scan_bwd_kernel' in name and key in name:
                print(f'scan_bwd_kernel, {label}:')
                report(code, bounds, passes)
                found = True
    if not found:
        parser.error(f'{args.listing}: no scan_bwd_kernel<CrossIo<...>> in the listing '
                     '(expected the output of nvdisasm -gi on a cubin of cross_scan.cu)')


if __name__ == '__main__':
    main()
