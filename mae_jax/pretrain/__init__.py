"""MAE pretraining (train.py): configs and the training library."""
