# Everything a fresh machine needs: `make demo` runs the pipeline end to end on a synthetic
# dataset, `make test` runs the linter and the test suite. Both build .venv from nothing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO   ?= demo
# torch and torchvision are pinned here (not in setup.cfg) to the builds that resolve on these machines.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check imet tests benchmarks

test: lint
	$(BIN)/pytest -q

# The demo: synth -> featurize -> fit every head -> blend them on val -> evaluate (Table 1) -> submission -> report.
DEMO_IMAGES ?= 300
STORE  := $(DEMO)/store.h5
ATTN   ?= --epochs 6 --hidden 256 --attention-dim 256 --pred-dim 256
# Compact maps (channel PCA to 256, int8; README, "Compact maps"): the maps heads fit 3-4x faster, which keeps
# the demo within its budget; MAPS= featurizes the paper's float16 2048 maps.
MAPS   ?= --maps-dim 256 --maps-dtype int8
MODELS := $(DEMO)/linear.pt $(DEMO)/linear_hog.pt $(DEMO)/attn_rnn.pt $(DEMO)/attn_rnn_hog.pt \
          $(DEMO)/attn_rnn_no_attention.pt $(DEMO)/attn_rnn_pool_truth.pt $(DEMO)/lgbm.pt \
          $(DEMO)/csra.pt $(DEMO)/mldecoder.pt
BLENDED := linear linear_hog lgbm csra mldecoder

demo: $(STAMP)
	$(BIN)/imet synth $(DEMO)/data --images $(DEMO_IMAGES) --seed 0 --corrupt 5
	$(BIN)/imet summary $(DEMO)/data
	@# Exit status 3 means "ImageNet weights not in the torch cache and not downloadable": only then random weights.
	$(BIN)/imet featurize $(DEMO)/data --out $(STORE) $(MAPS) --weights imagenet || { rc=$$?; \
	  if [ $$rc -ne 3 ]; then echo "!!! featurize failed (exit status $$rc; its message is above): the demo stops."; \
	    exit $$rc; fi; \
	  echo; echo "!!! ImageNet weights are not available offline: featurizing with --weights random instead."; \
	  echo "!!! The pipeline runs the same, but the features carry no ImageNet knowledge and scores stay low."; \
	  echo "!!! Put resnet50-0676ba61.pth in \$$TORCH_HOME/hub/checkpoints/ (or pass --weights FILE) for real runs."; \
	  echo; $(BIN)/imet featurize $(DEMO)/data --out $(STORE) $(MAPS) --weights random; }
	$(BIN)/imet store verify $(STORE)
	$(BIN)/imet fit --store $(STORE) --head linear --out $(DEMO)/linear.pt
	$(BIN)/imet fit --store $(STORE) --head linear_hog --out $(DEMO)/linear_hog.pt
	$(BIN)/imet fit --store $(STORE) --head lgbm --out $(DEMO)/lgbm.pt
	$(BIN)/imet fit --store $(STORE) --head csra --hog --epochs 8 --out $(DEMO)/csra.pt
	$(BIN)/imet fit --store $(STORE) --head mldecoder --hog --epochs 8 --width 128 --out $(DEMO)/mldecoder.pt
	$(BIN)/imet fit --store $(STORE) --head attn_rnn --init-from $(DEMO)/linear.pt $(ATTN) --out $(DEMO)/attn_rnn.pt
	$(BIN)/imet fit --store $(STORE) --head attn_rnn --hog --init-from $(DEMO)/linear_hog.pt $(ATTN) \
	  --out $(DEMO)/attn_rnn_hog.pt
	$(BIN)/imet fit --store $(STORE) --head attn_rnn --no-attention --init-from $(DEMO)/linear.pt $(ATTN) \
	  --out $(DEMO)/attn_rnn_no_attention.pt
	$(BIN)/imet fit --store $(STORE) --head attn_rnn --pool truth --init-from $(DEMO)/linear.pt $(ATTN) \
	  --out $(DEMO)/attn_rnn_pool_truth.pt
	$(BIN)/imet blend fit --store $(STORE) $(foreach m,$(BLENDED),--model $(DEMO)/$(m).pt) --out $(DEMO)/blend.json
	@echo; echo "Table 1 on the test split (the paper's four rows, the ablations, LightGBM, CSRA, ML-Decoder, their blend):"
	$(BIN)/imet evaluate --store $(STORE) --model $(MODELS) $(DEMO)/blend.json --split test --json $(DEMO)/table1.json
	$(BIN)/imet predict --store $(STORE) --model $(DEMO)/attn_rnn.pt --out $(DEMO)/submission_attn_rnn.csv \
	  --probs $(DEMO)/attn_rnn_votes.h5 --attention $(DEMO)/attention.h5
	$(BIN)/imet predict --store $(STORE) --model $(DEMO)/blend.json --out $(DEMO)/submission.csv
	$(BIN)/imet report --store $(STORE) --model $(MODELS) --split test --out $(DEMO)/report
	@echo; echo "submission: $(DEMO)/submission.csv (the blend)"; echo "report:     $(DEMO)/report/index.html"

clean:
	rm -rf $(VENV) $(DEMO) build *.egg-info
