"""UniRAG Explorer: retrieval as reasoning with hierarchical semantic docids."""

__version__ = "0.1.0"
