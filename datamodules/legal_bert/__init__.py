"""Legal text classification data (LexGLUE JSONL, CSV/TSV, CLAUDETTE ToS, generated contract clauses)."""
from datamodules.legal_bert.datamodule import LegalTextDataModule
from datamodules.legal_bert.formats import DataFormatError

__all__ = ["LegalTextDataModule", "DataFormatError"]
