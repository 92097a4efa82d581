#!/usr/bin/env python3
"""Which guest code a VM translated under TCG, by function, from QEMU's `-d in_asm` log.

usage: tb_profile.py LOG VMLINUX AGENT [--top N] [--phases MARK ...]

LOG is what `qemu-system-x86_64 ... -d in_asm -D LOG` wrote (one entry per translated block, in the order they
were translated); VMLINUX the guest kernel with symbols; AGENT the kata-agent binary in the initrd (static-pie:
its load address is found by matching block addresses to its symbols). Prints the blocks and guest
instructions translated per function and per crate or kernel part. With --phases, splits the log at the first
block of each function whose name contains MARK (in order) and counts each part: e.g.
`--phases create_sandbox create_container ContainerBuilderImpl::create start_container`.
"""
import argparse
import bisect
import collections
import re
import subprocess


def symbols(path):
    out = subprocess.run(["nm", "-C", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    syms = sorted(
        (int(parts[0], 16), parts[2])
        for parts in (line.split(" ", 2) for line in out.splitlines())
        if len(parts) == 3 and parts[1] in "tTwW"
    )
    return [a for a, _ in syms], [n for _, n in syms]


def blocks(log):
    """(first guest address, guest instructions) of each translated block, in translation order."""
    out, current = [], None
    for line in open(log, errors="replace"):
        if line.startswith("IN:"):
            current = [None, 0]
            out.append(current)
        elif current is not None and line.startswith("0x"):
            if current[0] is None:
                current[0] = int(line.split(":")[0], 16)
            current[1] += 1
    return [(a, n) for a, n in out if a is not None]


def load_base(user_addrs, agent_addrs):
    """The agent's load address: the offset that puts the most block starts on symbol starts."""
    by_page_offset = collections.defaultdict(list)
    for s in agent_addrs:
        by_page_offset[s & 0xFFF].append(s)
    votes = collections.Counter()
    for a in user_addrs[:3000]:
        for s in by_page_offset.get(a & 0xFFF, [])[:50]:
            votes[a - s] += 1
    return votes.most_common(1)[0][0] if votes else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("vmlinux")
    ap.add_argument("agent")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--phases", nargs="*", default=[])
    args = ap.parse_args()

    tbs = blocks(args.log)
    kaddr, kname = symbols(args.vmlinux)
    aaddr, aname = symbols(args.agent)
    base = load_base([a for a, _ in tbs if 0x7F0000000000 <= a < 0x800000000000], aaddr)

    def name(a):
        if a >= 0xFFFF800000000000:
            i = bisect.bisect_right(kaddr, a) - 1
            return "kernel " + (kname[i] if i >= 0 else "?")
        if 0x7F0000000000 <= a < 0x800000000000:
            i = bisect.bisect_right(aaddr, a - base) - 1
            return "agent " + (aname[i] if i >= 0 else "?")
        return "other user code"

    def part(n):
        if n.startswith("agent "):
            m = re.match(r"<?(?:impl )?&?(?:mut )?([a-z_0-9]+)", n[6:])
            return "agent: " + (m.group(1) if m else n[6:26])
        return n.split(" ")[0]

    names = [name(a) for a, _ in tbs]
    print(f"{len(tbs)} blocks, {sum(n for _, n in tbs)} guest instructions; agent loaded at {base:#x}")
    for title, key in (("by function", lambda n: n), ("by part", part)):
        count, insns = collections.Counter(), collections.Counter()
        for n, (_, k) in zip(names, tbs):
            count[key(n)] += 1
            insns[key(n)] += k
        print(f"\n{title}: blocks, instructions")
        for k, v in count.most_common(args.top):
            print(f"{v:7} {insns[k]:8}  {k[:140]}")
    if args.phases:
        cuts = [0]
        for mark in args.phases:
            at = next((i for i in range(cuts[-1], len(names)) if mark in names[i]), None)
            cuts.append(at if at is not None else cuts[-1])
        cuts.append(len(names))
        print("\nby phase: blocks (kernel), instructions")
        for label, start, end in zip(["before " + args.phases[0]] + args.phases, cuts, cuts[1:]):
            kernel = sum(1 for n in names[start:end] if n.startswith("kernel"))
            insns = sum(k for _, k in tbs[start:end])
            print(f"{end - start:7} ({kernel:6}) {insns:8}  {label}")


if __name__ == "__main__":
    main()
