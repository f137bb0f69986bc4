"""The k-NN monitor: DINO's weighted k-NN (eval_knn.py `knn_classifier`, written out below in
torch) and the labelled subsets it reads."""

import jax.numpy as jnp
import numpy as np
import torch

from mae_jax.classification import knn
from mae_jax.classification.synthetic import write_labelled_dataset


def dino_knn_probs(train_features, train_labels, test_features, k, T, num_classes):
    """DINO's knn_classifier for one chunk (features L2-normalised): the class votes."""
    train_features = train_features.t()
    batch_size = test_features.shape[0]
    similarity = torch.mm(test_features, train_features)
    distances, indices = similarity.topk(k, largest=True, sorted=True)
    candidates = train_labels.view(1, -1).expand(batch_size, -1)
    retrieved_neighbors = torch.gather(candidates, 1, indices)
    retrieval_one_hot = torch.zeros(batch_size * k, num_classes)
    retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
    distances_transform = distances.clone().div_(T).exp_()
    return torch.sum(torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes),
                               distances_transform.view(batch_size, -1, 1)), 1)


def test_votes_match_dinos_knn_classifier():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(64, 16)).astype(np.float32)
    labels = rng.integers(0, 7, 500)
    bank_t = torch.nn.functional.normalize(torch.from_numpy(bank), dim=1)
    queries_t = torch.nn.functional.normalize(torch.from_numpy(queries), dim=1)
    expected = dino_knn_probs(bank_t, torch.from_numpy(labels), queries_t, 20, 0.07, 7).numpy()
    ours = np.asarray(knn.knn_scores(knn.l2_normalize(jnp.asarray(queries)),
                                     knn.l2_normalize(jnp.asarray(bank)), jnp.asarray(labels),
                                     num_classes=7, k=20, temperature=0.07))
    np.testing.assert_allclose(ours, expected, rtol=2e-4)
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


def test_separated_classes_are_all_found_and_k_is_capped_by_the_bank():
    centres = np.eye(4, 8, dtype=np.float32)
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(4), 5)
    bank = centres[labels] + 0.05 * rng.normal(size=(20, 8)).astype(np.float32)
    queries = centres + 0.05 * rng.normal(size=(4, 8)).astype(np.float32)
    scores = knn.knn_scores(knn.l2_normalize(jnp.asarray(queries)),
                            knn.l2_normalize(jnp.asarray(bank)), jnp.asarray(labels),
                            num_classes=4, k=50)  # k > bank: all 20 neighbours vote
    np.testing.assert_array_equal(np.asarray(scores).argmax(-1), np.arange(4))


def test_labelled_subset_is_spread_over_a_class_sorted_folder(tmp_path):
    folder = write_labelled_dataset(str(tmp_path), num_train=96, num_val=8, num_classes=4,
                                    size=8)
    images, labels = knn.load_labelled_subset(
        source=f"folder:{folder}", split="train", count=20, image_size=8, data_dir=None,
        download=False, batch_size=8)
    assert images.shape == (20, 8, 8, 3) and images.dtype == np.uint8
    # Every 5th (ceil(96 / 20)) image of a listing sorted by class: the four classes evenly.
    np.testing.assert_array_equal(np.bincount(labels), [5, 5, 5, 5])
    images, labels = knn.load_labelled_subset(
        source=f"folder:{folder}", split="val", count=100, image_size=8, data_dir=None,
        download=False, batch_size=8)
    assert len(labels) == 8  # the whole split when it is smaller than count
