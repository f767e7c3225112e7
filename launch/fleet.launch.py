"""Scale-out: one fleet process (`vla-runtime fleet`) per GPU, robots assigned by configuration.

    ros2 launch vla_runtime fleet.launch.py robots:=/arm_1,/arm_2,/arm_3,/arm_4 gpus:=0,1
    ros2 launch vla_runtime fleet.launch.py robots:="/arm_1,/arm_2;/arm_3" gpus:=0,1   # explicit groups

Each process serves its robots' namespaces with a policy node each over one batched server on its GPU
(nodes/fleet.py); robots on other hosts reach them over ROS 2 (DDS). Written to the launch API of ROS 2
Jazzy; the parameters file comes first, then only the node parameters given as arguments (generated from
the node's one parameter table, as in policy.launch.py).
"""

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, ExecuteProcess, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from vla_runtime.nodes.fleet import plan_fleet
from vla_runtime.nodes.params import PARAMS, command_line_overrides

from launch import LaunchDescription


def fleet_processes(context):
    # the device is the plan's, one GPU per process: not a launch argument here
    given = {p.name: LaunchConfiguration(p.name).perform(context) for p in PARAMS if p.name != "device"}
    overrides = command_line_overrides(given)
    plan = plan_fleet(
        LaunchConfiguration("robots").perform(context), LaunchConfiguration("gpus").perform(context)
    )
    params_file = LaunchConfiguration("params_file").perform(context)
    processes = []
    for device, namespaces in plan:
        # The file first, then the plan's device (both through the command's shortcuts, in that order),
        # then the given parameters: a later --params-file would override the device again.
        cmd = ["vla-runtime", "fleet", "--namespaces", ",".join(namespaces)]
        cmd += ["--params-file", params_file, "--device", device, "--ros-args"]
        for override in overrides:
            cmd += ["-p", override]
        processes.append(ExecuteProcess(cmd=cmd, name=f"fleet_{device.replace(':', '_')}", output="screen"))
    return processes


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("vla_runtime"), "config", "policy.yaml")
    arguments = [
        DeclareLaunchArgument(
            "robots",
            description="Robot namespaces, comma-separated; ';' separates one GPU's group from the next",
        ),
        DeclareLaunchArgument("gpus", default_value="0", description="GPU indices, one fleet process each"),
        DeclareLaunchArgument("params_file", default_value=default_params, description="Parameters YAML"),
    ] + [
        DeclareLaunchArgument(p.name, default_value="", description=f"{p.description} (default: the file's)")
        for p in PARAMS
        if p.name != "device"
    ]
    return LaunchDescription([*arguments, OpaqueFunction(function=fleet_processes)])
