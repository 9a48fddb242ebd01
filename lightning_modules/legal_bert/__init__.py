"""Legal text classification with a pretrained BERT encoder (LexGLUE-style metrics)."""
from lightning_modules.legal_bert.ensemble import LegalBertEnsemble
from lightning_modules.legal_bert.module import LegalBertClassifier

__all__ = ["LegalBertClassifier", "LegalBertEnsemble"]
