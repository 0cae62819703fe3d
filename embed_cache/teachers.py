"""Teacher specs: what a teacher is, as recorded in the store.

A spec is plain data. Two specs that differ in any recorded field produce different targets, so
a store refuses a teacher whose spec differs from the one it was created with.
"""

from dataclasses import asdict, dataclass, fields

from .errors import CacheError


@dataclass(frozen=True)
class TeacherSpec:
    name: str  # short name used on the command line and as the store's record key
    model: str  # hub id or local folder
    dim: int  # output dimension the store reserves for this teacher
    revision: str | None = None  # pinned hub revision (commit hash); None for local folders
    max_length: int = 512
    prompt: str = ""  # prepended to every text; none by default (the authors' final setup)
    pooling: str = "model"  # "model": the sentence-transformers modules the model ships
    dtype: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU
    trust_remote_code: bool = False  # explicit opt-in only, recorded here

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise CacheError(
                f"teacher name {self.name!r} is not usable as a store key: "
                "use letters, digits, '-' and '_' only (e.g. 'nv-embed')."
            )
        if self.dim <= 0:
            raise CacheError(f"teacher {self.name!r} has dim={self.dim}: give its output dimension (> 0).")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TeacherSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CacheError(
                f"teacher spec has unknown fields {unknown}; valid fields are {sorted(known)}."
            )
        return cls(**data)

    def differences(self, other: "TeacherSpec") -> list[str]:
        """Human-readable 'field: ours != theirs' lines; empty when the specs match."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key}: {mine[key]!r} != {theirs[key]!r}" for key in mine if mine[key] != theirs[key]]
