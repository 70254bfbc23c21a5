"""The teacher-ranking targets of dense distillation at every tree level, on a hand-made two-level tree."""

import math

import numpy as np
import pytest
import torch

from unirag.errors import UniragError
from unirag.joint.distillation import (
    TeacherRanking,
    bm25_document_probs,
    document_distillation,
    document_paths,
    level_distillation,
)

# Two-level tree: (0,0) (0,1) under node (0,); (1,0) under (1,). Node rows in tree_prefixes order:
# (0,)=0, (0,0)=1, (0,1)=2, (1,)=3, (1,0)=4.
ROWS = {(0,): 0, (0, 0): 1, (0, 1): 2, (1,): 3, (1, 0): 4}
DOCIDS = [(0, 0), (0, 1), (1, 0)]


def ranking(temperature=1.0):
    vectors = np.eye(3, dtype=np.float32)  # document i is the unit vector e_i
    paths = document_paths(lambda prefixes: [ROWS[p] for p in prefixes], DOCIDS)
    assert paths == [[0, 1], [0, 2], [3, 4]]
    return TeacherRanking(vectors, paths, num_nodes=5, temperature=temperature)


def test_node_sums_equal_the_teachers_mass():
    teacher = ranking()
    query = torch.tensor([[1.0, 0.5, 0.0]])
    probs = teacher.document_probs(query)
    expected = torch.softmax(torch.nn.functional.normalize(query, dim=-1) @ torch.eye(3), -1)
    assert torch.allclose(probs, expected) and math.isclose(float(probs.sum()), 1.0, rel_tol=1e-6)
    mass = teacher.node_mass(probs)[0]
    assert torch.allclose(mass[0], probs[0, 0] + probs[0, 1])  # (0,) holds its two documents
    assert torch.allclose(mass[3], probs[0, 2]) and torch.allclose(mass[4], probs[0, 2])
    assert torch.allclose(mass[0] + mass[3], torch.tensor(1.0))  # the root's children hold all the mass
    assert torch.allclose(mass[1] + mass[2], mass[0])  # children sum to their parent


def _level_inputs(student_level0, student_level1):
    """One example whose gold docid is (0, 1): level 0 chooses among (0,),(1,); level 1 among (0,0),(0,1)."""
    vocab = 2
    picked = torch.tensor([[student_level0, student_level1]], dtype=torch.float32, requires_grad=True)
    allowed = torch.ones(1, 2, vocab, dtype=torch.bool)
    targets = torch.tensor([[0, 1]])
    node_rows = torch.tensor([[[ROWS[(0,)], ROWS[(1,)]], [ROWS[(0, 0)], ROWS[(0, 1)]]]])
    return picked, allowed, targets, node_rows


def test_level_kl_is_zero_when_the_student_matches_the_teacher_and_positive_otherwise():
    teacher = ranking()
    mass = teacher.node_mass(teacher.document_probs(torch.tensor([[1.0, 0.5, 0.0]])))
    t0 = torch.stack([mass[0, 0], mass[0, 3]])
    t1 = torch.stack([mass[0, 1], mass[0, 2]]) / mass[0, 0]
    picked, allowed, targets, node_rows = _level_inputs(t0.log().tolist(), t1.log().tolist())
    assert float(level_distillation(picked, allowed, targets, node_rows, mass)) == pytest.approx(0.0, abs=1e-6)
    picked, allowed, targets, node_rows = _level_inputs([0.0, 3.0], [2.0, 0.0])
    kl = level_distillation(picked, allowed, targets, node_rows, mass)
    p0, p1 = torch.softmax(torch.tensor([0.0, 3.0]), 0), torch.softmax(torch.tensor([2.0, 0.0]), 0)
    by_hand = ((t0 * (t0 / p0).log()).sum() + (t1 * (t1 / p1).log()).sum()) / 2
    assert float(kl) == pytest.approx(float(by_hand), rel=1e-5) and float(kl) > 0
    kl.backward()
    assert picked.grad is not None and torch.isfinite(picked.grad).all()


def test_level_kl_ignores_disallowed_children_and_padded_levels():
    teacher = ranking()
    mass = teacher.node_mass(teacher.document_probs(torch.tensor([[0.2, 0.1, 1.0]])))
    # Level 1 under (1,): one child (1,0); a second vocabulary slot is not allowed (its logit must not count).
    picked = torch.tensor([[[0.5, -1.0], [4.0, 100.0]]])
    allowed = torch.tensor([[[True, True], [True, False]]])
    node_rows = torch.tensor([[[ROWS[(0,)], ROWS[(1,)]], [ROWS[(1, 0)], -1]]])
    targets = torch.tensor([[1, 0]])
    kl = level_distillation(picked, allowed, targets, node_rows, mass)
    t0 = torch.stack([mass[0, 0], mass[0, 3]])
    only_level0 = (t0 * (t0 / torch.softmax(picked[0, 0], 0)).log()).sum() / 2  # level 1 is certain: KL 0
    assert float(kl) == pytest.approx(float(only_level0), rel=1e-5)
    padded = level_distillation(picked, allowed, torch.tensor([[1, -100]]), node_rows, mass)
    assert float(padded) == pytest.approx(float(only_level0 * 2), rel=1e-5)


def test_document_kl_non_negative_and_zero_at_the_teacher():
    teacher = ranking(temperature=0.5)
    probs = teacher.document_probs(torch.tensor([[1.0, 0.2, 0.1], [0.0, 0.0, 1.0]]))
    assert float(document_distillation(probs.log(), probs)) == pytest.approx(0.0, abs=1e-6)
    for seed in range(5):
        matches = torch.randn(2, 3, generator=torch.Generator().manual_seed(seed))
        assert float(document_distillation(matches, probs)) > 0


def test_bm25_teacher_is_a_softmax_of_the_scores_and_mixes_at_its_weight():
    scores = {"a": [3.0, 1.0, 0.0], "b": [0.0, 0.0, 2.0]}
    sparse = bm25_document_probs(lambda text: scores[text], ["a", "b"], temperature=0.5)
    assert sparse.dtype == torch.float16 and sparse.shape == (2, 3)
    expected = torch.softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 0.0, 2.0]]) / 0.5, -1)
    assert torch.allclose(sparse.float(), expected, atol=1e-3)
    teacher = ranking()
    query = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    dense = teacher.document_probs(query)
    assert torch.equal(teacher.document_probs(query, sparse, 0.0), dense)
    mixed = teacher.document_probs(query, sparse, 0.25)
    assert torch.allclose(mixed, 0.75 * dense + 0.25 * sparse.float())
    assert torch.allclose(mixed.sum(-1), torch.ones(2), atol=1e-3)
    # The BM25 teacher changes which node holds the most mass for the first text: dense says (0, 1), BM25 (0, 0).
    assert int(teacher.document_probs(query, sparse, 1.0)[0].argmax()) == 0 and int(dense[0].argmax()) == 1


def test_bm25_teacher_refuses_bad_settings():
    with pytest.raises(UniragError, match="temperature"):
        bm25_document_probs(lambda text: [1.0], ["a"], temperature=0)
    with pytest.raises(UniragError, match="shape"):
        ranking().document_probs(torch.ones(1, 3), torch.ones(2, 3), 0.5)
