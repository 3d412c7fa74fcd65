.PHONY: demo test lint bench
demo:  ## Pushgateway + Prometheus on 127.0.0.1, the Celery, Airflow, Prefect examples and exec jobs, then status
	scripts/demo
test:  ## the whole test suite (every nox session)
	scripts/test
lint:
	scripts/test -s lint
bench:
	scripts/bench
