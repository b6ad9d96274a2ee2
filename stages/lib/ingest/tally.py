"""What the render stage counts, for data/rendered/stats.json (docs/formats.md) and its summary lines.

Counts are kept per piece of work and merged in order, so they are the same with one process or many. Besides
the records read, written and skipped, every suspicious record is counted with its first few locations: empty
answers, conversations without a user turn or ending on one, empty documents (dropped), records longer than
render.long_record_chars, and the fields that were dropped, by name.
"""

from dataclasses import dataclass, field

MAX_SKIPPED_LISTED = 100  # stats.json lists the first skipped records; the count covers all
MAX_LOCATIONS = 5  # first locations kept per suspicious kind and per dropped field
SUSPICIOUS = {
    "empty_answer": "empty answers (nothing to learn but EOS; render.empty_answers: skip drops them)",
    "no_user_turn": "conversations without a user turn",
    "long_record": "records longer than render.long_record_chars",
    "ends_on_user_turn": "conversations ending on a user turn (kept as context, with no answer to learn)",
    "empty_document": "empty documents (plain text with nothing in it, dropped)",
    "identical_answers": "preference pairs whose chosen and rejected answers are the same",
    "prompts_differ": "preference pairs whose chosen and rejected transcripts disagree on the prompt (the chosen "
                      "one's is used)",
}


@dataclass
class Tally:
    """How often something was seen, and where first."""

    count: int = 0
    first: list = field(default_factory=list)

    def add(self, where: str, n: int = 1) -> None:
        self.count += n
        if len(self.first) < MAX_LOCATIONS:
            self.first.append(where)

    def merge(self, other: "Tally") -> None:
        self.count += other.count
        self.first = (self.first + other.first)[:MAX_LOCATIONS]

    def as_json(self) -> dict:
        return {"count": self.count, "first": self.first}


@dataclass
class Stats:
    """Counts for stats.json."""

    records_read: int = 0
    records_written: int = 0
    records_skipped: int = 0
    characters: int = 0
    skipped: list = field(default_factory=list)
    formats: dict = field(default_factory=dict)
    templates: set = field(default_factory=set)
    suspicious: dict = field(default_factory=dict)  # kind -> Tally
    fields_dropped: dict = field(default_factory=dict)  # field name -> Tally
    sources: list = field(default_factory=list)  # one dict per source: path, weight, validation, records
    written_by_source: dict = field(default_factory=dict)  # source index -> records written

    def skip(self, where: dict) -> None:
        """Count a skipped record (`where`: its location and problem, as stats.json lists it)."""
        self.records_skipped += 1
        if len(self.skipped) < MAX_SKIPPED_LISTED:
            self.skipped.append(where)

    def flag(self, kind: str, where: str) -> None:
        """Count a suspicious record (kind: a key of SUSPICIOUS)."""
        self.suspicious.setdefault(kind, Tally()).add(where)

    def dropped(self, names, where: str, n: int = 1) -> None:
        """Count fields that nothing read, by name."""
        for name in names:
            # get before setdefault: no new Tally per record on the hot path when the name is known
            (self.fields_dropped.get(name) or self.fields_dropped.setdefault(name, Tally())).add(where, n)

    def merge(self, other: "Stats") -> None:
        """Add the counts of a later piece of work."""
        self.records_read += other.records_read
        self.records_written += other.records_written
        self.records_skipped += other.records_skipped
        self.characters += other.characters
        self.skipped = (self.skipped + other.skipped)[:MAX_SKIPPED_LISTED]
        self.templates |= other.templates
        for mine, theirs in ((self.suspicious, other.suspicious), (self.fields_dropped, other.fields_dropped)):
            for key, tally in theirs.items():
                mine.setdefault(key, Tally()).merge(tally)
        for source, n in other.written_by_source.items():
            self.written_by_source[source] = self.written_by_source.get(source, 0) + n

    def as_json(self) -> dict:
        sources = [{**s, "records": self.written_by_source.get(i, 0)} for i, s in enumerate(self.sources)]
        return {"records_read": self.records_read, "records_written": self.records_written,
                "records_skipped": self.records_skipped, "characters": self.characters, "skipped": self.skipped,
                "formats": self.formats, "templates": sorted(self.templates),
                "suspicious": {k: self.suspicious[k].as_json() for k in SUSPICIOUS if k in self.suspicious},
                "fields_dropped": {k: v.as_json() for k, v in sorted(self.fields_dropped.items())},
                "sources": sources}

    def warnings(self) -> list[str]:
        """One line per kind of suspicious record and for the dropped fields, naming the first places."""
        lines = [f"{tally.count:,} {SUSPICIOUS[kind]}, first: {', '.join(tally.first[:3])}"
                 for kind, tally in ((k, self.suspicious[k]) for k in SUSPICIOUS if k in self.suspicious)]
        if self.fields_dropped:
            named = ", ".join(f"{name} ({t.count:,}x, first {t.first[0]})"
                              for name, t in sorted(self.fields_dropped.items()))
            lines.append(f"fields nothing reads, dropped: {named}; map one in render.fields if it holds data")
        return lines
