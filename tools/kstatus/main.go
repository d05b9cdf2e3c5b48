// kstatus-check prints what sigs.k8s.io/cli-utils' kstatus (the library Flux, kpt and Config Sync
// use to judge a resource's health) says about the objects it reads: one JSON line per object
// given as a JSON document on stdin (a single object, or a list under "items").
//
//	go build -o kstatus-check . && kubectl get ar -o json | ./kstatus-check
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type verdict struct {
	Name    string `json:"name"`
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	var doc map[string]interface{}
	if err := json.Unmarshal(raw, &doc); err != nil {
		fail(err)
	}
	objects := []interface{}{doc}
	if items, ok := doc["items"].([]interface{}); ok {
		objects = items
	}
	out := json.NewEncoder(os.Stdout)
	for _, item := range objects {
		text, err := json.Marshal(item)
		if err != nil {
			fail(err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(text); err != nil { // numbers as int64, as the API server's objects
			fail(err)
		}
		res, err := status.Compute(u)
		if err != nil {
			fail(err)
		}
		if err := out.Encode(verdict{Name: u.GetName(), Status: res.Status.String(), Message: res.Message}); err != nil {
			fail(err)
		}
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus-check:", err)
	os.Exit(1)
}
