"""Joint retrieval-as-reasoning model: one LLM that generates docids, then answers from those documents."""

from unirag.joint.decoding import (
    AnswerGeneration,
    DocidBeam,
    DocidSearch,
    JointSystem,
    answer_prompt,
    answer_with_docs,
    generate_docids,
    question_likelihood,
    retrieval_prompt,
    search_docids,
)
from unirag.joint.modeling import JointConfig, JointModel, JointOutput

__all__ = [
    "AnswerGeneration",
    "DocidBeam",
    "DocidSearch",
    "JointConfig",
    "JointModel",
    "JointOutput",
    "JointSystem",
    "answer_prompt",
    "answer_with_docs",
    "generate_docids",
    "question_likelihood",
    "retrieval_prompt",
    "search_docids",
]
