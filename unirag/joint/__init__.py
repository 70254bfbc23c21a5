"""Joint retrieval-as-reasoning model: one LLM that generates docids, then answers from those documents.

    config      JointConfig                       checkpoint  save/load, fingerprints, LoRA reader alone
    modeling    JointModel (modules + forward)    prompts     retrieval / answer / self-check prompts
    search      trie-constrained docid search     selfcheck   query-likelihood re-rank
    reader      answer from chosen documents      system      JointSystem = retrieve + read
"""

from unirag.joint.checkpoint import load_lora_reader
from unirag.joint.config import JointConfig
from unirag.joint.joint_system import JointSystem, Retrieval
from unirag.joint.modeling import JointModel, JointOutput
from unirag.joint.prompts import Prompt, answer_prompt, retrieval_prompt
from unirag.joint.reader import AnswerGeneration, answer_with_docs
from unirag.joint.search import DocidBeam, DocidSearch, DocidTrie, ranking_name, search_docids
from unirag.joint.selfcheck import question_likelihood, rerank

__all__ = [
    "AnswerGeneration",
    "DocidBeam",
    "DocidSearch",
    "DocidTrie",
    "JointConfig",
    "JointModel",
    "JointOutput",
    "JointSystem",
    "Prompt",
    "Retrieval",
    "answer_prompt",
    "answer_with_docs",
    "load_lora_reader",
    "question_likelihood",
    "ranking_name",
    "rerank",
    "retrieval_prompt",
    "search_docids",
]
