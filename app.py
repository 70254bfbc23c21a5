"""UniRAG Explorer app (placeholder until the app issue): dense RAG vs No RAG on the embedded models."""

from __future__ import annotations

import argparse
import os

import gradio as gr

from unirag.backbones import load_llm
from unirag.data import dataset_paths, load_corpus
from unirag.errors import UniragError
from unirag.rag import DenseRagSystem, DenseRetriever, NoRagSystem, Reader


def build_demo(corpus_name: str = "nq") -> gr.Blocks:
    corpus = load_corpus(dataset_paths(corpus_name, "dev")[0])
    model, tokenizer = load_llm()
    reader = Reader(model, tokenizer)
    rag = DenseRagSystem(DenseRetriever.from_corpus(corpus), reader)
    norag = NoRagSystem(reader)

    def ask(question: str):
        try:
            a, b = rag.answer(question), norag.answer(question)
        except UniragError as exc:
            raise gr.Error(str(exc)) from None
        docs = "\n".join(f"- [{d.score:.3f}] {d.title}" for d in a.docs)
        return a.text, docs, b.text

    with gr.Blocks(title="UniRAG Explorer") as demo:
        gr.Markdown(
            "# UniRAG Explorer\nThe joint model view arrives with the next release; "
            "this page compares vanilla dense RAG with the LLM alone."
        )
        question = gr.Textbox(label="Question")
        button = gr.Button("Ask")
        rag_answer, rag_docs, norag_answer = gr.Textbox(label="Dense RAG"), gr.Markdown(), gr.Textbox(label="No RAG")
        button.click(ask, question, [rag_answer, rag_docs, norag_answer])
    return demo


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default=os.environ.get("UNIRAG_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("UNIRAG_PORT", "7860")))
    args = parser.parse_args()
    build_demo().queue(default_concurrency_limit=1).launch(server_name=args.host, server_port=args.port)
