#!/bin/sh
# Generated from inventory/vagrant.yaml by tests/test_vagrant.py --update-goldens.
set -eu
docker network inspect mesh-demo >/dev/null 2>&1 || docker network create mesh-demo
docker container inspect api-v2-1 >/dev/null 2>&1 || docker run --detach --name api-v2-1 --hostname api-v2-1 --network mesh-demo --restart always -m 64m --label mesh-lab=demo --label mesh-demo.service=api mesh-demo-app:vagrant /usr/bin/python3 /opt/mesh-demo/demoapp.py --service api --version v2 --port 9090 --host dock1 --instance api-v2-1 --kind container --protocol http --upstream db=127.0.0.1:19102
docker container inspect api-v2-2 >/dev/null 2>&1 || docker run --detach --name api-v2-2 --hostname api-v2-2 --network mesh-demo --restart always -m 64m --label mesh-lab=demo --label mesh-demo.service=api mesh-demo-app:vagrant /usr/bin/python3 /opt/mesh-demo/demoapp.py --service api --version v2 --port 9090 --host dock1 --instance api-v2-2 --kind container --protocol http --upstream db=127.0.0.1:19102
