"""A deliberately naive, loop-based restatement of DESIGN.md's example construction.

The Polars pipeline is checked against it on random logs: two independent readings of the
same rules must agree example for example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

DAY = 86_400


@dataclass(frozen=True)
class Event:
    user: str
    item: str
    category: str
    ts: int


@dataclass(frozen=True)
class RefExample:
    split: str
    user: str
    long_items: tuple[str, ...]
    long_tau: tuple[float, ...]
    short_items: tuple[str, ...]
    target: str
    user_category: str | None
    ref_time: int
    history_end: int


def tau(ref_ts: int, ts: int) -> float:
    delta = max(1, ref_ts // DAY - ts // DAY + 1)
    buckets = sum(1 for k in range(1, 13) if delta >= 2**k)
    return 1.0 / max(1, buckets)


def sessions_of(events: list[Event], rule: str, gap: int) -> list[list[int]]:
    """Lists of positions, one per session."""
    out: list[list[int]] = []
    for pos, e in enumerate(events):
        if pos == 0:
            out.append([pos])
            continue
        prev = events[pos - 1]
        new = e.ts // DAY != prev.ts // DAY if rule == "day" else e.ts - prev.ts > gap
        if new:
            out.append([pos])
        else:
            out[-1].append(pos)
    return out


def mode_category(events: list[Event]) -> str | None:
    """The most frequent category, ties to the one that appeared first (the reference code's
    `pd.value_counts(categories).index[0]`)."""
    counts: dict[str, int] = {}
    for e in events:  # dicts keep first-appearance order
        counts[e.category] = counts.get(e.category, 0) + 1
    return max(counts, key=lambda c: counts[c]) if counts else None  # max keeps the first


def choice(user_index: int, seed: int, n: int) -> int:
    h = (user_index * 1_103_515_245 + seed * 12_345 + 1_013_904_223) % 2_147_483_647
    h = (h * 1_103_515_245 + 12_345) % 2_147_483_647
    return h % n


VALID_STREAM = 1_000_003  # the validation target's draw: choice(user, seed + VALID_STREAM, c)


def _held_out(split, user, events, session, r, keep_target, max_long, max_short) -> RefExample:
    """The test (or validation) example of `session`: its r-th event is the target."""
    i = session[0]
    short_pos = [p for p in session if keep_target or p != i + r]
    ref = events[i].ts
    return _example(split, user, events, i, short_pos, events[i + r].item, ref, max_long, max_short)


def _last_session(
    user, events, sessions, index, cap, seed, protocol, max_long, max_short, rng, train_targets
) -> list[RefExample]:
    """DESIGN.md's `last-session` split (or, with protocol "reference", the paper's); with
    train_targets "events", every event of sessions 1..v-1 is a training target whose short
    term is the earlier events of its own session."""
    m = min(len(events), cap) if cap else len(events)
    transitions: list[int] = []  # session numbers of the paper's training transitions
    test_at = None
    for number, s in enumerate(sessions[1:], start=1):
        if s[0] + len(s) < m - 1:
            transitions.append(number)
        else:
            test_at = number
            break
    if test_at is None:
        return []
    reference = protocol == "reference"
    test_session = sessions[test_at]
    c = len(test_session)
    # the reference: the builder's random.choice(new_session), only for several items
    r = (rng.choice(range(c)) if c > 1 else 0) if reference else choice(index, seed, c)
    out = [
        _held_out("test", user, events, test_session, r, reference and c == 1, max_long, max_short)
    ]
    valid_at = test_at - 1
    if not reference and valid_at >= 1:
        session = sessions[valid_at]
        r = choice(index, seed + VALID_STREAM, len(session))
        out.append(_held_out("valid", user, events, session, r, False, max_long, max_short))
    if train_targets == "events":
        for s in sessions[1:valid_at]:
            for pos in s:
                short = [p for p in s if p < pos]
                target = events[pos].item
                out.append(
                    _example("train", user, events, s[0], short, target, events[s[0]].ts,
                             max_long, max_short)
                )  # fmt: skip
        return out
    for number in transitions:
        if not reference and number + 1 >= valid_at:
            continue  # its target lies in the validation or the test session
        s = sessions[number]
        i, c = s[0], len(s)
        target = events[i + c].item
        out.append(_example("train", user, events, i, s, target, events[i].ts, max_long, max_short))
    return out


def _example(split, user, events, h, short_pos, target, ref, max_long, max_short) -> RefExample:
    long = events[:h][-max_long:]
    short = [events[p].item for p in short_pos]
    if max_short:
        short = short[-max_short:]
    return RefExample(
        split=split,
        user=user,
        long_items=tuple(e.item for e in long),
        long_tau=tuple(tau(ref, e.ts) for e in long),
        short_items=tuple(short),
        target=target,
        user_category=mode_category(events[:h]),
        ref_time=ref,
        history_end=h,
    )


def build(
    by_user: dict[str, list[Event]],
    user_index: dict[str, int],
    *,
    split: str,
    rule: str = "day",
    gap: int = 0,
    cap: int = 0,
    seed: int = 0,
    max_long: int = 50,
    max_short: int = 0,
    valid_from: int = 0,
    test_from: int = 0,
    protocol: str = "leak-free",
    train_targets: str = "transitions",
) -> list[RefExample]:
    """All examples of every user (events already in the pipeline's stable time order).

    With protocol "reference" the test targets come from the reference code's own random
    stream, replayed: Python's `random` seeded 1234 + seed draws a negative for every event of
    every user in user order (the builder's `gen_neg`), then a choice in a multi-item test
    session."""
    out: list[RefExample] = []
    rng = random.Random(1234 + seed)
    distinct = {e.item for events in by_user.values() for e in events}
    numeric = all(item.isdigit() for item in distinct)
    rank = {item: i for i, item in enumerate(sorted(distinct, key=int if numeric else str))}
    for user, events in sorted(by_user.items(), key=lambda kv: user_index[kv[0]]):
        if protocol == "reference":
            seen = {rank[e.item] for e in events}
            assert len(seen) < len(distinct), "the pipeline refuses such logs"
            for _ in events:  # the builder's gen_neg(), once per event
                neg = rank[events[0].item]
                while neg in seen:
                    neg = rng.randint(0, len(distinct) - 1)
        if split != "last-session" and cap:
            events = events[:cap]
        sessions = sessions_of(events, rule, gap)
        if split == "last-session":
            out.extend(
                _last_session(
                    user, events, sessions, user_index[user], cap, seed, protocol,
                    max_long, max_short, rng, train_targets,
                )
            )  # fmt: skip
            continue
        session_of = {p: s for s in sessions for p in s}
        n = len(events)
        for pos in range(1, n):
            s = session_of[pos]
            i = s[0]
            short_pos = [p for p in s if p < pos]
            if split == "leave-one-out":
                name = "test" if pos == n - 1 else "valid" if pos == n - 2 else "train"
            else:
                t = events[pos].ts
                name = "train" if t < valid_from else "valid" if t < test_from else "test"
            out.append(
                _example(
                    name,
                    user,
                    events,
                    i,
                    short_pos,
                    events[pos].item,
                    events[i].ts,
                    max_long,
                    max_short,
                )
            )
    return out
