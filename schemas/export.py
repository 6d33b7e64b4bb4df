"""Write the JSON Schema files for agents in other languages: `python -m schemas.export [--check]`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import TypeAdapter

from schemas.envelope import ENVELOPE_ADAPTER, CodePayload, EmbedPayload, GeneratePayload, GraphPayload
from schemas.errors import ErrorCode, ErrorInfo
from schemas.graph import CodeAnalysis, CodeAnalysisChunk, GraphChunk, KnowledgeGraph
from schemas.result import Result

SCHEMA_DIR = Path(__file__).parent / "json"


def rendered_schemas() -> dict[str, str]:
    """File name to file text, for every published schema."""
    schemas = {
        "envelope.schema.json": ENVELOPE_ADAPTER.json_schema(),
        "result.schema.json": Result.model_json_schema(),
        "error.schema.json": ErrorInfo.model_json_schema(),
        "error_codes.schema.json": TypeAdapter(ErrorCode).json_schema(),
        "payload.embed.schema.json": EmbedPayload.model_json_schema(),
        "payload.generate.schema.json": GeneratePayload.model_json_schema(),
        "payload.graph.schema.json": GraphPayload.model_json_schema(),
        "payload.code.schema.json": CodePayload.model_json_schema(),
        "knowledge_graph.schema.json": KnowledgeGraph.model_json_schema(),
        "knowledge_graph.chunk.schema.json": GraphChunk.model_json_schema(),
        "code_analysis.schema.json": CodeAnalysis.model_json_schema(),
        "code_analysis.chunk.schema.json": CodeAnalysisChunk.model_json_schema(),
    }
    return {name: json.dumps(body, indent=2, sort_keys=True) + "\n" for name, body in schemas.items()}


def stale_files(directory: Path = SCHEMA_DIR) -> list[str]:
    """Names whose checked-in text differs from what the models generate (or that are missing or extra)."""
    wanted = rendered_schemas()
    present = {p.name for p in directory.glob("*.json")}
    stale = [n for n, text in wanted.items() if not (directory / n).is_file() or (directory / n).read_text() != text]
    return sorted(stale + sorted(present - wanted.keys()))


def main(argv: list[str]) -> int:
    if "--check" in argv:
        stale = stale_files()
        if stale:
            print("stale JSON Schema files (run `python -m schemas.export`): " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for name, text in rendered_schemas().items():
        (SCHEMA_DIR / name).write_text(text)
    for extra in set(p.name for p in SCHEMA_DIR.glob("*.json")) - rendered_schemas().keys():
        (SCHEMA_DIR / extra).unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
