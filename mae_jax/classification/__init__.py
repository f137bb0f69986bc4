"""Judging the representation: linear probing (`linprobe`), fine-tuning (`finetune`), both on
`lib` (data, state, evaluation, exports); their pieces (`lars`, `mixup`, `erasing`, `evaluation`,
`transfer`); the k-NN monitor of pretraining (`knn`); the decoder ablation (`ablation`)."""
