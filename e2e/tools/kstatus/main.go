// Command kstatus prints the health that Flux (and any kstatus user) computes for one
// Kubernetes object. It reads the object as JSON on stdin, as `kubectl get -o json`
// prints it, and writes one JSON line: {"status":"InProgress|Current|...","message":"..."}.
//
// It calls sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute, the same function Flux's
// kustomize-controller uses for `wait: true` and healthChecks, so the e2e suite judges a
// ConfidentialVM by the real rules rather than a re-implementation of them.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "usage: kubectl get KIND NAME -o json | kstatus")
		os.Exit(2)
	}
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading stdin: %v", err)
	}
	// apimachinery's decoder, not encoding/json: unstructured wants whole numbers as
	// int64 (metadata.generation), and encoding/json would make them float64.
	var obj map[string]interface{}
	if err := utiljson.Unmarshal(raw, &obj); err != nil {
		fail("stdin is not a JSON object (pipe in `kubectl get ... -o json`): %v", err)
	}
	if obj == nil {
		fail("stdin holds JSON null, not an object (pipe in `kubectl get ... -o json`)")
	}
	res, err := status.Compute(&unstructured.Unstructured{Object: obj})
	v := verdict{Status: status.UnknownStatus.String()}
	if err != nil {
		// Compute fails on malformed status fields; kstatus callers treat that as Unknown,
		// so say so instead of exiting, and keep the reason.
		v.Message = err.Error()
	} else {
		v = verdict{Status: res.Status.String(), Message: res.Message}
	}
	out, err := json.Marshal(v)
	if err != nil {
		fail("encoding the result: %v", err)
	}
	fmt.Println(string(out))
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "kstatus: "+format+"\n", args...)
	os.Exit(2)
}
