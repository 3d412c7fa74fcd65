.PHONY: demo test lint bench
demo:  ## a real local Pushgateway, sample exec jobs, what the gateway holds
	scripts/demo
test:  ## the whole test suite (every nox session)
	scripts/test
lint:
	scripts/test -s lint
bench:
	scripts/bench
