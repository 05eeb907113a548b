"""The defaults of `tlsan federate` (a module of its own so that the CLI reads them without
importing torch). Chosen on validation NDCG@10 (Digital_Music, Clothing; README, "Federated
fine-tuning", and `benchmarks/federated.py panel`):

- cohorts of 100 users per client: one user per client meant 1,285 clients on Clothing and
  rounds of minutes, most of it per-message overhead;
- a third of the clients train in each round (Digital_Music: best validation 0.0998 in 408 s
  of rounds against 0.1028 in 1,023 s with every client, same load);
- local batch 64 at lr 2e-3 when no preset or config is given: the central preset's batch of
  512 gives a cohort one or two steps a round, and the federated model stalled at the
  popularity level (Digital_Music validation 0.042 at its best round, against 0.103);
- the softmax over 32 sampled negatives (not the central preset's full softmax, `ce`): the
  recipe every federated figure was measured with (docs/experiments/federated.md);
- every client on the validation panel: smaller panels keep worse rounds (Clothing, 13
  clients, 500 drawn panels per share: the kept round's validation NDCG@10 is 0.0241 with
  every client, 0.0233 with half, p90 shortfall 0.006, 0.0212 with a fifth) and save little
  (evaluating costs about 0.04 s per client and round); with one user per client (1,285
  clients on Clothing) a full panel costs about a minute a round, and a fraction pays off.
"""

DEFAULT_ROUNDS = 50
DEFAULT_CLIENT_UNIT = "cohort:100"
DEFAULT_TRAIN_FRACTION = 0.35  # of the clients train in each round (when no --clients-per-round)
DEFAULT_EVAL_FRACTION = 1.0
FEDERATED_BATCH_SIZE = 64
FEDERATED_LR = 2e-3
FEDERATED_LOSS = "softmax"
DEFAULT_PATIENCE = 5
DEFAULT_MIN_ROUNDS = 20
DEFAULT_PERSONAL_LR_SCALE = 1.0
DEFAULT_PERSONAL_EPOCHS = 10
