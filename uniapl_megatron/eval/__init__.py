"""Evaluation: IFEval data and scoring (``ifeval_data``, ``ifeval_score``), distribution analyses
(``distributions``, ``logprobs``), the paper-shaped table (``tables``), file helpers (``io``) and
constructed responses for tests and benchmarks (``constructed``)."""
