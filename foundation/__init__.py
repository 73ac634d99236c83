"""The foundation room: the frozen recommender, its pre-training, and FedPA adapters (plain PyTorch, no Flower).

Modules (import what you need; nothing heavy is imported here):

- ``batch``      the batch tensor contract every model consumes
- ``config``     FoundationConfig (transformers config), ConfigError
- ``model``      FoundationModel (transformers PreTrainedModel), load_foundation, count_parameters
- ``checkpoint`` CheckpointError, sealed safetensors, atomic directory replace
- ``pretrain``   pretrain(...), evaluate(...)
- ``metrics``    AUC, GAUC, LogLoss, weighted P/R/F1, HR/NDCG@K (numpy)
- ``adapters``   FedPA adapters through peft (attach/save/load, exchange, merge_for_user)
- ``quantize``   int8 dynamic quantization for inference
- ``testing``    random batches that follow the contract (tests, benchmarks)
- ``errors``     FedpaError
"""
